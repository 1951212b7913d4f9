"""Run one launched process (torchrun, or a setup's own command) with a per-setup timeout and clean teardown.

torchrun starts its workers in new sessions, so killing torchrun's process group does not reach
them; on a timeout we walk /proc for every descendant and signal each one. Every launched program
runs under parity.core.lifeline's supervisor, a subreaper that, when the program exits however it
exits, ends every process the program left behind (a background child, a daemon that forked
twice). torchrun and every rank also die with their parent (PR_SET_PDEATHSIG), so not even a
SIGKILLed launcher leaves ranks behind.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from parity.core.errors import InputError
from parity.core.files import read_tail
from parity.core.lifeline import ERROR_MARK, end_processes, wrapped
from parity.core.root_cause import root_cause

DEFAULT_TIMEOUT_S = 900.0
LOG_TAIL_LINES = 15
# A log goes into a failure message by its end only, never read whole: a runaway log of many GB
# would otherwise fill memory, and a message with progress bars in it would be megabytes long.
LOG_TAIL_BYTES = 16 << 10
# A failing rank's ERROR_MARK line is the last it prints (parity.rank.train), so its log's end holds it.
ERROR_SCAN_BYTES = 1 << 20


@dataclass
class LaunchResult:
    status: str  # "ok" | "failed" | "timeout" | "interrupted"
    returncode: int | None
    message: str
    wall_s: float
    progress: dict | None = None  # the last progress record the launch wrote: which setup it was on


def kill_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the launched process (its supervisor) and all its descendants, SIGKILL what is left after grace_s."""
    end_processes(proc.pid, grace_s, include_root=True, reap=proc.poll)  # poll: reap it so it does not count as alive
    proc.wait()


def log_tails(log_dirs: list[Path]) -> str:
    logs = [log for d in log_dirs for log in sorted(d.glob("rank*.log"), key=lambda p: int(p.stem[4:]))]
    return "\n".join(_tail(log) for log in logs)


def first_error(log_dirs: list[Path]) -> str | None:
    """The earliest failure any rank reported; the others usually just lost their peer."""
    errors = []
    for d in log_dirs:
        for log in d.glob("rank*.log"):
            try:
                lines = read_tail(log, ERROR_SCAN_BYTES).splitlines()
            except OSError:
                continue  # its tail says why, if it is shown
            for line in lines:
                if line.startswith(ERROR_MARK):
                    stamp, _, text = line[len(ERROR_MARK):].strip().partition(" ")
                    if _is_number(stamp):  # a line that only looks like ours must not crash the launcher
                        errors.append((float(stamp), text))
    if not errors:
        return None
    errors.sort()
    more = f" ({len(errors) - 1} other rank(s) failed after it)" if len(errors) > 1 else ""
    return errors[0][1] + more


def omp_threads() -> str:
    """Intra-op threads per rank: PARITY_OMP_THREADS, checked (every rank would fail on a bad one), else 1."""
    value = os.environ.get("PARITY_OMP_THREADS", "1")
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 1024:
        raise InputError(f"environment variable PARITY_OMP_THREADS={value[:40]!r}: allowed: a whole number of "
                         "threads per rank from 1 to 1024 (unset: 1)")
    return str(int(value))


def process_env(gpus: list[str] | None = None, extra: dict | None = None) -> dict:
    """The environment of every launch: one intra-op thread per rank unless PARITY_OMP_THREADS says otherwise."""
    env = dict(os.environ, OMP_NUM_THREADS=omp_threads(), PYTHONUNBUFFERED="1", **(extra or {}))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def run_process(argv: list[str], env: dict, log_path: Path, timeout_s: float, progress: Path | None = None,
                on_progress=None, log_dirs=(), cwd: Path | None = None, label: str | None = None,
                abort=None, clear_progress: bool = True) -> LaunchResult:
    """Run one launch (torchrun, or a setup's own command) with its output in log_path, and wait.

    Each setup gets timeout_s: the clock starts with the process and again whenever the `progress`
    file (written by rank 0, see parity.rank.train) names a new setup, so a launch that trains many
    setups in turn is not cut short. Past it, on Ctrl-C or on any error here, the process and all
    its descendants are killed. `on_progress(record, seconds in this setup)` sees each progress
    record. `log_dirs` (a list, or a function giving it when the launch has ended) hold rank*.log
    files whose tails and first error explain a failure; `label` names the process in messages
    (default: the program's file name). `abort()`, asked while the process runs, gives a reason to
    stop it now (another node's part of the launch failed), or None. `clear_progress`: remove a
    stale progress file first; False where another process owns it (node 0, on a shared filesystem).
    """
    label = label or Path(argv[0]).name
    if progress is not None and clear_progress:
        progress.unlink(missing_ok=True)  # the previous launch's last step is not ours
    start = clock = time.monotonic()
    current = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(wrapped(argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                record = _read_progress(progress) or current
                if record is not None and (current is None or _setup_of(record) != _setup_of(current)):
                    clock = time.monotonic()  # a new setup: its own timeout_s starts now
                current = record
                stop = None  # (status, why): this setup ran out of time, or another node's part failed
                if time.monotonic() - clock > timeout_s:
                    stop = ("timeout", f"timed out after {timeout_s:.0f} s")
                elif abort is not None and (reason := abort()) is not None:
                    stop = ("failed", reason)
                if stop is not None:
                    kill_tree(proc)
                    tails = log_tails(_resolved(log_dirs)) or _tail(log_path)
                    return LaunchResult(stop[0], None, f"{stop[1]}; killed {label} and its descendants. Log tails:\n"
                                        f"{tails}", time.monotonic() - start, current)
                if on_progress and current is not None:
                    on_progress(current, time.monotonic() - clock)
                time.sleep(0.25)
        except BaseException:  # Ctrl-C or an error here: take the ranks down with us
            kill_tree(proc)
            raise
    current = _read_progress(progress) or current
    wall = time.monotonic() - start
    if proc.returncode == 0:
        return LaunchResult("ok", 0, "", wall, current)
    dirs = _resolved(log_dirs)
    error = first_error(dirs)
    head = f"a rank failed: {error}" if error else f"{label} exited with code {proc.returncode}" + _cause(log_path)
    tails = log_tails(dirs)
    return LaunchResult("failed", proc.returncode, f"{head}\n" + (f"Rank log tails:\n{tails}\n" if tails else "")
                        + _tail(log_path), wall, current)


def _cause(log_path: Path) -> str:
    """': <why>' from the log of a program that reports no parity error mark (parity.core.root_cause), or ''."""
    try:
        cause = root_cause(read_tail(log_path, ERROR_SCAN_BYTES))
    except OSError:
        return ""  # its tail, shown below the head, says why it cannot be read
    return f": {cause}" if cause else ""


def _resolved(log_dirs) -> list[Path]:
    """run_process's `log_dirs`: a list, or a function giving it once the launch has ended."""
    return log_dirs() if callable(log_dirs) else log_dirs


def _read_progress(path: Path | None) -> dict | None:
    """The progress record, or None before the first one (it is replaced whole, never half-written)."""
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _setup_of(record: dict) -> tuple:
    return record.get("case"), record.get("setup")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _tail(log_path: Path) -> str:
    """The last LOG_TAIL_LINES lines of a log, from at most its last LOG_TAIL_BYTES, under a header naming it."""
    try:
        lines = read_tail(log_path, LOG_TAIL_BYTES).splitlines()[-LOG_TAIL_LINES:]
    except OSError as e:
        return f"--- {log_path} (cannot read: {e.strerror or e}) ---"
    return f"--- {log_path} (last {len(lines)} lines) ---\n" + "\n".join(lines)
