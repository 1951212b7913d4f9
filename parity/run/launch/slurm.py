"""`parity run ... --launcher slurm`: a job script that runs the same `parity run` on every node.

It is torchtitan's multi-node pattern: one SLURM task per node, and each task starts torchrun
for its node (here through `parity run --node-rank R`, which starts one torchrun per launch of
the plan). The job's first node is node 0: its address, asked of that node by `srun hostname`,
is the rendezvous endpoint, and its `parity` hosts the rendezvous, judges and writes the report.
The run directory and the seed cache (PARITY_CACHE) must be on a filesystem every node shares.
The nodes' messages are signed with PARITY_RDZV_SECRET, which the script makes for the job unless
the submitter set one (parity.run.launch.channel).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

RDZV_PORT = 29500  # torchrun's usual port; PARITY_RDZV_PORT, set when submitting, picks another


def job_script(run_args: list[str], nnodes: int, world_size: int, device: str, workdir: Path) -> str:
    """The sbatch script. `run_args`: `parity run`'s arguments, without the per-node ones (set here);
    relative paths in them are relative to `workdir`, where the job starts (and SLURM writes slurm-JOBID.out)."""
    # This environment's interpreter: the job runs the parity installed where the script was made.
    parity = [sys.executable, "-m", "parity.cli", "run", *run_args]
    lines = ["#!/bin/bash", "#SBATCH --job-name=parity", f"#SBATCH --nodes={nnodes}", "#SBATCH --ntasks-per-node=1"]
    if device != "cpu":
        lines.append(f"#SBATCH --gpus-per-node={world_size // nnodes}")
    lines += [f"#SBATCH --chdir={shlex.quote(str(workdir))}",
              "# One `parity run` per node. Node 0, the job's first node, hosts the rendezvous, plans, judges",
              "# and writes the report; the run directory and PARITY_CACHE must be on a shared filesystem.",
              "set -euo pipefail"]
    if nnodes == 1:
        return "\n".join(lines + ["exec " + shlex.join(parity)]) + "\n"
    make_secret = shlex.join([sys.executable, "-c", "import secrets; print(secrets.token_hex(32))"])
    lines += ["# The nodes sign their messages with one secret per job, made here unless the submitter set",
              "# PARITY_RDZV_SECRET: srun hands the environment to every node, and it never touches disk.",
              f'if [ -z "${{PARITY_RDZV_SECRET:-}}" ]; then PARITY_RDZV_SECRET=$({make_secret}); fi',
              "export PARITY_RDZV_SECRET",
              'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              'head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk \'{print $1}\')',
              f"parity=({shlex.join(parity)} --nnodes {nnodes} --rdzv-endpoint \"$head_ip:${{PARITY_RDZV_PORT:-{RDZV_PORT}}}\")",
              "# --kill-on-bad-exit: a node that fails takes the job down rather than leaving the others waiting.",
              "srun --kill-on-bad-exit=1 bash -c 'exec \"$@\" --node-rank \"$SLURM_NODEID\"' parity \"${parity[@]}\""]
    return "\n".join(lines) + "\n"
