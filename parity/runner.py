"""Run one case: seed checkpoint, then one torchrun launch per world size, then provenance for failures.

This is the glue the CLI and the pytest plugin share; it returns the run directory's contents as
plain values and leaves verdicts to parity.compare.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from parity import records
from parity.errors import InputError
from parity.launch import DEFAULT_TIMEOUT_S, LaunchResult, launch
from parity.spec import REPEAT_SUFFIX, Case, Setup, check_attention

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        # Baselines and reports are outputs, not code: rewriting them must not mark the run dirty.
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!baselines", ":!reports"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class DeviceError(InputError):
    """The requested device cannot run the case (too few GPUs)."""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str, case: Case, gpus: int | None = None) -> str:
    """auto: CUDA when enough GPUs are visible for the case, else CPU with gloo ranks; never a quiet fallback.

    `gpus` is how many GPUs this process may use (default: all visible). The device's SDPA
    kernels are checked too, so a case that cannot run there is rejected before anything starts.
    """
    if requested == "cpu":
        device = "cpu"
    else:
        gpus = visible_gpus() if gpus is None else gpus
        if requested == "cuda" and gpus < case.world_size:
            raise DeviceError(f"{case.path}: device cuda: case {case.name} needs {case.world_size} GPUs "
                              f"(one per rank of its largest setup), {gpus} visible")
        device = "cuda" if gpus >= case.world_size else "cpu"
    check_attention(case, device)
    return device


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def repeat_setup(case: Case) -> Setup:
    """The reference's second run, compared bitwise with the first before anything else."""
    return replace(case.reference, name=case.reference.name + REPEAT_SUFFIX, repeat=True)


def wants_repeat(case: Case, device: str, requested: bool | None = None) -> bool:
    """The command line's choice, else the case's `[expect] repeat`, else on for CUDA and off for CPU."""
    for choice in (requested, case.expect.repeat):
        if choice is not None:
            return choice
    return device == "cuda"


def with_steps(case: Case, steps: int | None) -> Case:
    if not steps:
        return case
    return replace(case, setups=tuple(replace(s, train=replace(s.train, steps=steps)) for s in case.setups))


def group_by_world_size(setups) -> dict[int, list[Setup]]:
    groups: dict[int, list[Setup]] = {}
    for s in setups:
        groups.setdefault(s.world_size, []).append(s)
    return groups


def seed_for(case: Case, cache: Path | None) -> tuple[str, str]:
    """(checkpoint path, sha256) for the case: its own seed_checkpoint, or the cached built one."""
    from parity.seed import checkpoint_sha256, seed_checkpoint

    if case.seed_checkpoint is not None:
        return str(case.seed_checkpoint), checkpoint_sha256(case.seed_checkpoint)
    keys = {(s.train.model, s.train.seed, s.train.dtype) for s in case.setups}
    if len(keys) != 1:  # a setup overriding seed or dtype still starts from the reference's weights
        keys = {(case.reference.train.model, case.reference.train.seed, case.reference.train.dtype)}
    model, seed, dtype = keys.pop()
    path, sha, _ = seed_checkpoint(model, seed, dtype, cache)
    return str(path), sha


def run_case(case: Case, out: Path, device: str = "auto", steps: int | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S, cache: Path | None = None, on_progress=None,
             command: list[str] | None = None, repeat: bool | None = None,
             gpus: list[str] | None = None) -> dict[str, LaunchResult]:
    """Run every setup of the case; returns {setup name: how its launch ended}.

    `gpus`: the GPU ids this run may use (CUDA_VISIBLE_DEVICES of its launches); default all visible.
    With `repeat` (see wants_repeat), the reference runs a second time, last in its launch.
    """
    import torch

    case = with_steps(case, steps)
    device = resolve_device(device, case, None if gpus is None else len(gpus))
    setups = list(case.setups) + ([repeat_setup(case)] if wants_repeat(case, device, repeat) else [])
    case_dir = Path(out) / case.name
    shutil.rmtree(case_dir, ignore_errors=True)  # stale files from an older run must never be compared
    case_dir.mkdir(parents=True)
    ckpt, seed_sha = seed_for(case, cache)
    provenance = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
                  "seed_checkpoint": ckpt, "seed_checkpoint_sha256": seed_sha, "case_path": str(case.path),
                  "case_sha256": case.sha256, "git_commit": git_commit(), "command": command}
    results: dict[str, LaunchResult] = {}
    launches = []
    with tempfile.TemporaryDirectory(prefix=".launch-", dir=case_dir) as workdir:
        for world_size, group in sorted(group_by_world_size(setups).items()):
            plan = {"case": case.name, "out": str(Path(out).resolve()), "device": device, "seed_checkpoint": ckpt,
                    "provenance": provenance, "determinism": case.determinism, "timeout_s": timeout_s,
                    "setups": [s.to_dict() for s in group]}
            result = launch(plan, world_size, Path(workdir), timeout_s, on_progress, gpus)
            launches.append({"world_size": world_size, "setups": [s.name for s in group], "status": result.status,
                             "wall_s": result.wall_s})
            if result.status != "ok":
                keep = case_dir / f"torchrun-ws{world_size}.log"
                shutil.copy(Path(workdir) / f"torchrun-ws{world_size}.log", keep)
            for s in group:  # a setup that finished before another one failed keeps its "ok"
                finished = _record_failure(case, s, result, provenance, device, out)
                results[s.name] = LaunchResult("ok", 0, "", result.wall_s) if finished else result
    (case_dir / ".progress").unlink(missing_ok=True)
    records.write_json(case_dir / "launches.json", launches)
    return results


def judge(case: Case, run_dir: Path, baseline_root: Path, update: str | None) -> dict:
    """The verdict between setups first, then the baselines, written to verdict.json.

    A baseline is written (as `update` allows) only from a case that passed: a run whose setups
    disagree, or whose reference is nondeterministic, is no reference for anyone.
    """
    from parity import baselines, compare

    passed = compare.compare_case(case, run_dir)["passed"]
    checks = baselines.check_case_baselines(case, run_dir, baseline_root, update if passed else None)
    if update and not passed:
        for b in checks:
            b["message"] += (f"; --update-baselines={update} wrote nothing: the case failed, and only a passing "
                             "case makes a baseline")
    verdict = compare.compare_case(case, run_dir, checks)
    compare.write_verdict(run_dir, verdict)
    return verdict


def _record_failure(case: Case, s: Setup, result: LaunchResult, provenance: dict, device: str, out: Path) -> bool:
    """True if the setup finished; otherwise write a run.json that says why, so no comparison can pass on it."""
    d = records.setup_dir(out, case.name, s.name)
    if (d / "run.json").is_file():  # rank 0 writes run.json last, after the metrics: this setup finished
        return True
    status = result.status if result.status != "ok" else "failed"
    records.write_json(d / "run.json", {**provenance, "case": case.name, "setup": s.name, "status": status,
                                        "device": device, "backend": backend_for(device),
                                        "world_size": s.world_size, "message": result.message,
                                        "ended": datetime.now(timezone.utc).isoformat()})
    return False
