"""One torchrun over the setups a plan puts together: on this node alone, or as this node's part of
a launch across nodes (parity.run.launch.nodes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from parity.core import records
from parity.core.process import DEFAULT_TIMEOUT_S, LaunchResult, process_env, run_process


def torchrun_argv(nproc: int, plan_path: Path, rendezvous: list[str] | None = None) -> list[str]:
    """`rendezvous`: torchrun's arguments for a launch across nodes (Nodes.rendezvous); None: this node alone,
    through --standalone, a private rendezvous on a free local port, so concurrent launches (xdist) never collide."""
    return [sys.executable, "-m", "torch.distributed.run", *(rendezvous or ["--standalone"]),
            f"--nproc-per-node={nproc}", "-m", "parity.rank", str(plan_path)]


def launch(plan: dict, nproc: int, workdir: Path, name: str, timeout_s: float = DEFAULT_TIMEOUT_S,
           on_progress=None, gpus: list[str] | None = None, log_dirs=(), rendezvous: list[str] | None = None,
           abort=None, on_written=None) -> LaunchResult:
    """Write the plan to workdir/NAME.json, run torchrun over it (its output in NAME.log), and wait.

    Never returns with a process left running. `nproc`: ranks on this node. `gpus`: the GPU ids the
    ranks may see (CUDA_VISIBLE_DEVICES); None leaves the environment's. The ranks write plan["progress"].
    `rendezvous`: this node's part of a launch across nodes (parity.run.launch.nodes). `abort()`: a reason to
    stop now (another node failed, or the run was interrupted while lanes ran), or None. `on_written(plan
    path)`: called once the plan file is in place, before torchrun starts (node 0 announces the launch).
    """
    plan_path = workdir / f"{name}.json"
    records.atomic_write_text(plan_path, json.dumps(plan, indent=2))
    if on_written is not None:
        on_written(plan_path)
    return run_process(torchrun_argv(nproc, plan_path, rendezvous), process_env(gpus), workdir / f"{name}.log",
                       timeout_s, Path(plan["progress"]), on_progress, log_dirs, label="torchrun", abort=abort)
