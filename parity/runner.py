"""Run one case: seed checkpoint, then one torchrun launch per world size, then provenance for failures.

This is the glue the CLI and the pytest plugin share; it returns the run directory's contents as
plain values and leaves verdicts to parity.compare.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from parity import records
from parity.errors import InputError
from parity.external.torchtitan import SeedBuildError
from parity.external.torchtitan import missing as titan_missing
from parity.launch import DEFAULT_TIMEOUT_S, LaunchResult, launch
from parity.paths import CASE_MARKER, inside
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
    """This machine cannot run the case: too few GPUs for the requested device, or a trainer not installed."""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str, case: Case, gpus: int | None = None) -> str:
    """auto: CUDA when enough GPUs are visible for the case, else CPU with gloo ranks; never a quiet fallback.

    `gpus` is how many GPUs this process may use (default: all visible). The device's SDPA
    kernels are checked too, so a case that cannot run there is rejected before anything starts.
    """
    if (why := titan_missing(case)) is not None:
        raise DeviceError(f"{case.path}: {why}")
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


def seed_for(case: Case, cache: Path | None, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
    """The case's seed checkpoint (its own seed_checkpoint, or the cached build), hashed and checked now.

    Returns parity.seed.SeedInfo; the notes say what was found damaged and repaired on the way. A
    case of torchtitan setups gets torchtitan's own seed checkpoint (built on `device` if not cached;
    parity.external.torchtitan.SeedBuildError if torchtitan cannot build it).
    """
    from parity.seed import resolve_seed

    if case.seed_checkpoint is None and any(s.trainer == "torchtitan" for s in case.setups):
        from parity.external import torchtitan

        return torchtitan.seed_checkpoint(case, device, cache, timeout_s)

    keys = {(s.train.model, s.train.seed, s.train.dtype) for s in case.setups}
    if len(keys) != 1:  # a setup overriding seed or dtype still starts from the reference's weights
        keys = {(case.reference.train.model, case.reference.train.seed, case.reference.train.dtype)}
    model, seed, dtype = keys.pop()
    return resolve_seed(model, seed, dtype, cache, external=case.seed_checkpoint)


def seed_or_none(case: Case, cache: Path | None, device: str, timeout_s: float):
    """seed_for, checked before anything is written, or None where torchtitan failed to build its seed:
    run_case then records that failure in every setup of the case, and other cases still run."""
    try:
        return seed_for(case, cache, device, timeout_s)
    except SeedBuildError:
        return None


def check_out(out: Path) -> Path:
    """Whether --out can become a run directory, judged without writing anything."""
    out = Path(out)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == out else f"lies under {existing}, which is not a directory"
        raise InputError(f"--out {out}: {what}; allowed: a directory or a new path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {existing} is not writable; allowed: a writable directory")
    return out


def prepare_out(out: Path) -> Path:
    """The run directory, created if need be; any reason it cannot hold a run is bad input, found now."""
    out = check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror}); allowed: a writable directory") from None
    return out


@contextmanager
def case_lock(out: Path, case_name: str):
    """One run of a case into one --out at a time: a second one fails at once instead of mixing files."""
    path = inside(out, f".{case_name}.lock")
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out / case_name}: another parity run is writing this case now; wait for it "
                             "or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fresh_case_dir(out: Path, case_name: str) -> Path:
    """An empty <out>/<case>/, marked as ours. An older folder is deleted only if it carries our mark."""
    case_dir = inside(out, case_name)
    if case_dir.is_symlink() or (case_dir.exists() and not (case_dir / CASE_MARKER).is_file()):
        raise InputError(f"{case_dir}: exists and was not made by parity; refusing to delete it; "
                         "allowed: move it away or choose another --out")
    if case_dir.exists():
        shutil.rmtree(case_dir)  # stale files from an older run must never be compared
    case_dir.mkdir()
    (case_dir / CASE_MARKER).write_text(case_name + "\n")
    return case_dir


def run_case(case: Case, out: Path, device: str = "auto", steps: int | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S, cache: Path | None = None, on_progress=None,
             command: list[str] | None = None, repeat: bool | None = None,
             gpus: list[str] | None = None, seed=None) -> dict[str, LaunchResult]:
    """Run every setup of the case; returns {setup name: how its launch ended}.

    `gpus`: the GPU ids this run may use (CUDA_VISIBLE_DEVICES of its launches); default all visible.
    With `repeat` (see wants_repeat), the reference runs a second time, last in its launch.
    `seed` is seed_for(case, cache) when the caller checked it already (before writing anything).
    The caller holds case_lock(out, case.name) for the run and its verdict.
    """
    import torch

    from parity.seed import verify

    case = with_steps(case, steps)
    device = resolve_device(device, case, None if gpus is None else len(gpus))
    setups = list(case.setups) + ([repeat_setup(case)] if wants_repeat(case, device, repeat) else [])
    unbuilt = None
    try:
        seed = seed or seed_for(case, cache, device, timeout_s)
    except SeedBuildError as e:  # torchtitan could not make its seed checkpoint: every setup fails with why
        unbuilt = LaunchResult("failed", None, str(e), 0.0)
    for note in () if unbuilt else seed.notes:
        print(f"parity: {note}", file=sys.stderr, flush=True)
    out = prepare_out(out)
    case_dir = fresh_case_dir(out, case.name)
    ckpt, seed_sha = (None, None) if unbuilt else (str(seed.path), seed.sha256)
    provenance = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
                  "seed_checkpoint": ckpt, "seed_checkpoint_sha256": seed_sha, "case_path": str(case.path),
                  "case_sha256": case.sha256, "git_commit": git_commit(), "command": command}
    if unbuilt:
        for s in setups:
            _record_failure(case, s, unbuilt, provenance, device, out)
        return {s.name: unbuilt for s in setups}
    results: dict[str, LaunchResult] = {}
    launches = []
    try:
        with tempfile.TemporaryDirectory(prefix=".launch-", dir=case_dir) as workdir:
            _launch_all(case, [s for s in setups if s.trainer == "builtin"], out, device, ckpt, provenance, timeout_s,
                        on_progress, Path(workdir), gpus, results, launches)
            _launch_external(case, [s for s in setups if s.trainer != "builtin"], out, device, ckpt, provenance,
                             timeout_s, on_progress, Path(workdir), gpus, results, launches, cache)
    except BaseException:  # Ctrl-C, SIGTERM: the setups that did not finish say so
        interrupted = LaunchResult("interrupted", None, "the run was interrupted before this setup finished", 0.0)
        for s in setups:
            if s.name not in results:
                _record_failure(case, s, interrupted, provenance, device, out)
        raise
    finally:
        (case_dir / ".progress").unlink(missing_ok=True)
        records.write_json(case_dir / "launches.json", launches)
    if not verify(seed.path, seed.sha256):  # no verdict, and no baseline, may rest on a changed seed
        changed = LaunchResult("failed", None, f"seed checkpoint {seed.path} changed during the run", 0.0)
        for s in setups:
            _record_failure(case, s, changed, provenance, device, out, overwrite=True)
            results[s.name] = changed
    return results


def _launch_all(case, setups, out, device, ckpt, provenance, timeout_s, on_progress, workdir: Path, gpus,
                results, launches):
    """Built-in setups: one torchrun launch per world size; fills results and launches as each one ends."""
    case_dir = out / case.name
    for world_size, group in sorted(group_by_world_size(setups).items()):
        plan = {"case": case.name, "out": str(Path(out).resolve()), "device": device, "seed_checkpoint": ckpt,
                "provenance": provenance, "determinism": case.determinism, "timeout_s": timeout_s,
                # steps is a shared [train] key: one list serves every setup of the launch
                "probe_steps": case.probes.steps_for(group[0].train.steps),
                "setups": [s.to_dict() for s in group]}
        result = launch(plan, world_size, workdir, timeout_s, on_progress, gpus)
        launches.append({"world_size": world_size, "setups": [s.name for s in group], "status": result.status,
                         "wall_s": result.wall_s})
        if result.status != "ok":
            keep = case_dir / f"torchrun-ws{world_size}.log"
            shutil.copy(workdir / f"torchrun-ws{world_size}.log", keep)
        for s in group:  # a setup that finished before another one failed keeps its "ok"
            finished = _record_failure(case, s, result, provenance, device, out)
            results[s.name] = LaunchResult("ok", 0, "", result.wall_s) if finished else result


def _launch_external(case, setups, out, device, ckpt, provenance, timeout_s, on_progress, workdir: Path, gpus,
                     results, launches, cache):
    """Command and torchtitan setups: one launch each, through parity.external.command."""
    from parity.external import command, torchtitan

    for s in setups:
        try:
            spec, own_ckpt, extra = (torchtitan.prepare(case, s, device, cache, timeout_s, workdir, ckpt)
                                     if s.trainer == "torchtitan" else (s.external, ckpt, {}))
        except SeedBuildError as e:  # this setup's own seed checkpoint could not be built
            result = LaunchResult("failed", None, str(e), 0.0)
        else:
            result = command.run_setup(spec, s, case.name, out, device, own_ckpt, provenance, timeout_s, on_progress,
                                       gpus, extra)
            launches.append({"world_size": s.world_size, "setups": [s.name], "status": result.status,
                             "wall_s": result.wall_s})
        _record_failure(case, s, result, provenance, device, out)
        results[s.name] = result


def judge(case: Case, run_dir: Path, baseline_root: Path, update: str | None) -> dict:
    """The verdict between setups first, then the baselines, written to verdict.json.

    A baseline is written (as `update` allows) only from a case that passed: a run whose setups
    disagree, or whose reference is nondeterministic, is no reference for anyone.
    """
    from parity import baselines, compare

    if not inside(run_dir, case.name).is_dir():
        raise InputError(f"{run_dir}: no run of case {case.name} here ({Path(run_dir) / case.name} is not a directory)")
    runs = compare.load_runs(case, run_dir)  # read once, for both checks
    between_setups = compare.compare_case(case, run_dir, runs=runs)  # judged once; baselines are added to it
    passed = between_setups["passed"]
    checks = baselines.check_case_baselines(case, run_dir, baseline_root, update if passed else None, runs)
    if update and not passed:
        for b in checks:
            b["message"] += (f"; --update-baselines={update} wrote nothing: the case failed, and only a passing "
                             "case makes a baseline")
    verdict = compare.with_baselines(between_setups, checks)
    compare.write_verdict(run_dir, verdict)
    return verdict


def _record_failure(case: Case, s: Setup, result: LaunchResult, provenance: dict, device: str, out: Path,
                    overwrite: bool = False) -> bool:
    """True if the setup finished; otherwise write a run.json that says why, so no comparison can pass on it."""
    d = records.setup_dir(out, case.name, s.name)
    if (d / "run.json").is_file() and not overwrite:  # rank 0 writes run.json last: this setup finished
        return True
    status = result.status if result.status != "ok" else "failed"
    records.write_json(d / "run.json", {**provenance, "case": case.name, "setup": s.name, "status": status,
                                        "device": device, "backend": backend_for(device),
                                        "world_size": s.world_size, "message": result.message,
                                        "ended": datetime.now(timezone.utc).isoformat()})
    return False
