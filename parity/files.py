"""Reading a file that came from outside (a case, a config, a baseline, a run directory): only a
regular file, without blocking, and never more than a bound.

`open()` on a FIFO waits for a writer forever, and on /dev/zero reads forever, so a case path or a
baseline that is not a regular file would hang the host. The file is opened non-blocking and
checked with fstat on the open descriptor (not before opening, which a swap could race). A refusal
is an OSError whose strerror says what the file is and what is allowed, so every caller's existing
"cannot read it (<strerror>)" line names the problem.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

MAX_BYTES = 1 << 30  # a case, config, record or baseline file is kilobytes to megabytes; 1 GiB is a mistake

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_bytes(path: str | Path, limit: int = MAX_BYTES) -> bytes:
    """The file's bytes; OSError if it is not a regular file or is larger than `limit`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"it is {_kind(st.st_mode)}; allowed: a regular file", str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"it holds {st.st_size} bytes; allowed: at most {limit}", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew while we read
        raise OSError(errno.EFBIG, f"it holds over {limit} bytes; allowed: at most {limit}", str(path))
    return data


def read_text(path: str | Path, limit: int = MAX_BYTES, errors: str = "strict") -> str:
    """The file as UTF-8 text (UnicodeDecodeError where it is not, unless `errors` says otherwise)."""
    return read_bytes(path, limit).decode("utf-8", errors=errors)


def check_regular(path: str | Path) -> None:
    """OSError unless `path` is a regular file, for a reader (numpy's memory map) that opens it itself."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, f"it is {_kind(mode)}; allowed: a regular file", str(path))
