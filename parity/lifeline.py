"""What the launcher and its ranks agree on, and nothing else: both import it, neither imports the other.

- ERROR_MARK: a failing rank prints `PARITY-ERROR: <unix time> <message>`; the launcher names the
  earliest such line as the cause (the other ranks usually just lost their peer).
- die_with_parent(): Linux PR_SET_PDEATHSIG, so a killed launcher (even by SIGKILL) takes its
  processes down, and they take theirs.
- wrapped(argv): the same guard for a program we start, set by a small exec wrapper
  (`python .../parity/lifeline.py PARENT_PID PROGRAM ARGS...`) rather than by a preexec_fn: running
  Python (ctypes) between fork and exec in a threaded parent can deadlock on a lock another thread
  held at the fork. The setting survives exec.
"""

import ctypes
import os
import signal
import sys

ERROR_MARK = "PARITY-ERROR:"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """If our parent dies (even by SIGKILL), the kernel kills this process.

    Set in every launched program (through wrapped()) and in every rank (parity.rank), so a killed
    `parity` or pytest takes torchrun down, and torchrun takes its ranks down.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's timeout and kill_tree still apply
        pass


def orphaned(parent_at_start: int) -> bool:
    """Whether the parent died before die_with_parent() was armed: the process was reparented since
    (to init or a subreaper), so no signal will ever come; it must exit on its own."""
    return os.getppid() != parent_at_start or parent_at_start == 1


def wrapped(argv: list[str]) -> list[str]:
    """argv, run so that it dies with this process. This file runs as a script (it needs only the
    standard library), so the wrapper works whatever the program's working directory and sys.path."""
    return [sys.executable, __file__, str(os.getpid()), *argv]


def _exec_wrapped(args: list[str]) -> None:
    parent, argv = int(args[0]), args[1:]
    die_with_parent()
    if orphaned(parent):
        sys.exit(f"parity.lifeline: the launcher (pid {parent}) is gone; not starting {argv[0]}")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _exec_wrapped(sys.argv[1:])
