"""What the launcher and its ranks agree on, and nothing else: both import it, neither imports the other.

- ERROR_MARK: a failing rank prints `PARITY-ERROR: <unix time> <message>`; the launcher names the
  earliest such line as the cause (the other ranks usually just lost their peer).
- die_with_parent(): Linux PR_SET_PDEATHSIG, so a killed launcher (even by SIGKILL) takes its
  processes down, and they take theirs.
- wrapped(argv): every program parity starts (torchrun, a setup's command) runs under a small
  supervisor, `python .../parity/lifeline.py PARENT_PID PROGRAM ARGS...`: it dies with parity, and
  when the program exits it ends every process the program left behind (see _supervise).
- descendants() and end_processes(): finding and ending a process tree through /proc, for the
  supervisor and for the launcher's timeout alike.

This file runs as a script and needs only the standard library.
"""

import ctypes
import os
import resource
import signal
import sys
import time

ERROR_MARK = "PARITY-ERROR:"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# How long leftovers get to exit on SIGTERM before SIGKILL.
GRACE_S = 5.0
# Signals the supervisor passes on to the program instead of dying of them itself.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value) == 0
    except (OSError, AttributeError):  # not Linux: the launcher's timeout and its tree walk still apply
        return False


def die_with_parent() -> None:
    """If our parent dies (even by SIGKILL), the kernel kills this process.

    Set in every supervisor and program it starts, and in every rank (parity.rank), so a killed
    `parity` or pytest takes torchrun down, and torchrun takes its ranks down.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def orphaned(parent_at_start: int) -> bool:
    """Whether the parent died before die_with_parent() was armed: the process was reparented since
    (to init or a subreaper), so no signal will ever come; it must exit on its own."""
    return os.getppid() != parent_at_start or parent_at_start == 1


def wrapped(argv: list[str]) -> list[str]:
    """argv, run under the supervisor. This file runs as a script, so the wrapper works whatever the
    program's working directory and sys.path; a script rather than a preexec_fn, because Python run
    between fork and exec in a threaded parent (parity's lanes) can deadlock on another thread's lock."""
    return [sys.executable, __file__, str(os.getpid()), *argv]


# --- the process table -------------------------------------------------------------------------


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


def end_processes(root: int, grace_s: float, include_root: bool, reap=lambda: None) -> None:
    """SIGTERM root's descendants (and root), give them grace_s, then SIGKILL whatever is left.

    The tree is walked again every round, so a child forked meanwhile is ended too; every pid once
    seen stays on the list, so one whose parent died first (reparented away from root) is not lost.
    `reap()` collects the exits of our own children, which would otherwise stay zombies.
    """
    seen: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        sent: set[int] = set()
        deadline = time.monotonic() + grace_s
        while True:
            reap()
            seen.update(descendants(root), [root] if include_root else [])
            live = {p for p in seen if alive(p)}
            if not live:
                return
            for pid in live - sent:  # once each: a second SIGTERM can cut short a program's own cleanup
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            sent |= live
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)


# --- the supervisor ------------------------------------------------------------------------------


def _supervise(parent: int, argv: list[str]) -> None:
    """Run argv as our child; when it exits, end every process it left behind; then exit as it did.

    We are a child subreaper (PR_SET_CHILD_SUBREAPER): an orphan anywhere below us, such as a
    daemon that forked twice and called setsid(), is reparented to us instead of to init, so it
    stays our descendant and cannot outlive the program. One supervisor per launch keeps this to
    the launch's own processes: a subreaper in the parity process itself would mix the orphans of
    launches running at once (lanes), and would have to reap every one of them.
    """
    die_with_parent()
    if orphaned(parent):
        sys.exit(f"parity.core.lifeline: the launcher (pid {parent}) is gone; not starting {argv[0]}")
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    me = os.getpid()
    child = os.fork()
    if child == 0:
        _exec_child(me, argv)
    for sig in FORWARDED:  # set after the fork: the child must not run these before its exec
        signal.signal(sig, lambda s, _frame: _send(child, s))
    status = _wait_for(child)
    end_processes(me, GRACE_S, include_root=False, reap=_reap_children)
    _exit_as(status)


def _exec_child(supervisor: int, argv: list[str]) -> None:
    """In the forked child (single-threaded: Python is safe to run here): become the program."""
    try:
        die_with_parent()
        if orphaned(supervisor):
            os._exit(1)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; the program expects the defaults
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"parity.core.lifeline: cannot start {argv[0]}: {e.strerror or e}", file=sys.stderr, flush=True)
    finally:
        os._exit(127)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_for(child: int) -> int:
    """The child's wait status; orphans reparented to us are reaped on the way."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            return status


def _reap_children() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:  # none left
        pass


def _exit_as(status: int) -> None:
    """Exit with the program's code, or die of the signal that killed it (no core file of our own)."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if -code != signal.SIGKILL:  # the one signal that has no handler to reset (and needs none)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code  # only if the signal did not end us
    sys.exit(code)


if __name__ == "__main__":
    _supervise(int(sys.argv[1]), sys.argv[2:])
