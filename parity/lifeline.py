"""What the launcher and its ranks agree on, and nothing else: both import it, neither imports the other.

- ERROR_MARK: a failing rank prints `PARITY-ERROR: <unix time> <message>`; the launcher names the
  earliest such line as the cause (the other ranks usually just lost their peer).
- die_with_parent(): Linux PR_SET_PDEATHSIG, so a killed launcher (even by SIGKILL) takes its
  processes down, and they take theirs.
"""

import ctypes
import signal

ERROR_MARK = "PARITY-ERROR:"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """If our parent dies (even by SIGKILL), the kernel kills this process.

    Set in torchrun (between fork and exec, by the launcher) and in every rank (parity.rank), so a
    killed `parity` or pytest takes torchrun down, and torchrun takes its ranks down.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's timeout and kill_tree still apply
        pass
