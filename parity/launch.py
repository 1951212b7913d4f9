"""Run a case's setups under torchrun: one launch per world size, with a timeout and clean teardown.

torchrun starts its workers in new sessions, so killing torchrun's process group does not reach
them; on a timeout we walk /proc for every descendant and signal each one. torchrun and every rank
also die with their parent (PR_SET_PDEATHSIG, see parity.lifeline), so not even a SIGKILLed
launcher leaves ranks behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from parity import records
from parity.lifeline import ERROR_MARK, die_with_parent

DEFAULT_TIMEOUT_S = 900.0
LOG_TAIL_LINES = 15


@dataclass
class LaunchResult:
    status: str  # "ok" | "failed" | "timeout"
    returncode: int | None
    message: str
    wall_s: float


def torchrun_argv(nproc: int, plan_path: Path) -> list[str]:
    # --standalone: a private rendezvous on a free local port, so concurrent launches (xdist) never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "parity.rank", str(plan_path)]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc/PID/stat, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its parent's reap is due


def descendants(pid: int) -> list[int]:
    """All live descendants of pid, found through /proc (they may sit in other sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[1], []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM torchrun and all its workers, give them grace_s to exit, then SIGKILL the rest."""
    pids = descendants(proc.pid) + [proc.pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap torchrun so it does not count as alive
            if not any(alive(p) for p in pids):
                break
            time.sleep(0.1)
        else:
            continue
        break
    proc.wait()


def log_tails(log_dirs: list[Path], lines: int = LOG_TAIL_LINES) -> str:
    parts = []
    for d in log_dirs:
        for log in sorted(d.glob("rank*.log"), key=lambda p: int(p.stem[4:])):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    return "\n".join(parts)


def first_error(log_dirs: list[Path]) -> str | None:
    """The earliest failure any rank reported; the others usually just lost their peer."""
    errors = []
    for d in log_dirs:
        for log in d.glob("rank*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(ERROR_MARK):
                    stamp, _, text = line[len(ERROR_MARK):].strip().partition(" ")
                    errors.append((float(stamp), text))
    if not errors:
        return None
    errors.sort()
    more = f" ({len(errors) - 1} other rank(s) failed after it)" if len(errors) > 1 else ""
    return errors[0][1] + more


def launch(plan: dict, nproc: int, workdir: Path, timeout_s: float = DEFAULT_TIMEOUT_S, on_progress=None,
           gpus: list[str] | None = None) -> LaunchResult:
    """Write the plan, run torchrun over it, and wait; never returns with a process left running.

    `gpus`: the GPU ids the ranks may see (CUDA_VISIBLE_DEVICES); None leaves the environment's.
    """
    case_dir = Path(plan["out"]) / plan["case"]
    plan_path = workdir / f"plan-ws{nproc}.json"
    records.atomic_write_text(plan_path, json.dumps(plan, indent=2))
    log_dirs = [case_dir / s["name"] for s in plan["setups"]]
    return run_process(torchrun_argv(nproc, plan_path), process_env(gpus), workdir / f"torchrun-ws{nproc}.log",
                       timeout_s, case_dir, on_progress, log_dirs, label="torchrun")


def process_env(gpus: list[str] | None = None, extra: dict | None = None) -> dict:
    """The environment of every launch: one intra-op thread per rank unless PARITY_OMP_THREADS says otherwise."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("PARITY_OMP_THREADS", "1"), PYTHONUNBUFFERED="1",
               **(extra or {}))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def run_process(argv: list[str], env: dict, log_path: Path, timeout_s: float, case_dir: Path, on_progress=None,
                log_dirs: list[Path] = (), cwd: Path | None = None, label: str | None = None) -> LaunchResult:
    """Run one launch (torchrun, or a setup's own command) with its output in log_path, and wait.

    Past timeout_s, on Ctrl-C or on any error here, the process and all its descendants are killed.
    `log_dirs` hold rank*.log files whose tails and first error explain a failure; `label` names the
    process in messages (default: the program's file name).
    """
    label = label or Path(argv[0]).name
    (case_dir / ".progress").unlink(missing_ok=True)  # the previous launch's last step is not ours
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout_s:
                    kill_tree(proc)
                    tails = log_tails(log_dirs) or _tail(log_path)
                    return LaunchResult("timeout", None, f"timed out after {timeout_s:.0f} s; killed {label} "
                                        f"and its descendants. Log tails:\n{tails}", time.monotonic() - start)
                if on_progress:
                    on_progress(case_dir / ".progress", time.monotonic() - start)
                time.sleep(0.25)
        except BaseException:  # Ctrl-C or an error here: take the ranks down with us
            kill_tree(proc)
            raise
    wall = time.monotonic() - start
    if proc.returncode == 0:
        return LaunchResult("ok", 0, "", wall)
    error = first_error(log_dirs)
    head = f"a rank failed: {error}" if error else f"{label} exited with code {proc.returncode}"
    tails = log_tails(log_dirs)
    return LaunchResult("failed", proc.returncode, f"{head}\n" + (f"Rank log tails:\n{tails}\n" if tails else "")
                        + _tail(log_path), wall)


def _tail(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return f"--- {log_path} (last {len(lines)} lines) ---\n" + "\n".join(lines)
