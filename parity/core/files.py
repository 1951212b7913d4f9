"""Reading files that someone else wrote (a case, a config, a baseline, a run record, a metrics file, a
log), so that reading them can neither hang nor exhaust memory.

Such a path is input: it may be a FIFO, a socket or a device instead of a file. open() on a FIFO
waits for a writer, forever; a device may never end. So every such file is opened by
open_regular(), whole files are read by read_bytes()/read_text() up to a bound, and a log that goes
into a message is read from its end by read_tail(), never whole. A refusal is an OSError whose
strerror says what the file is and what is allowed, so a caller's "cannot read it (<strerror>)"
line names the problem.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

MAX_BYTES = 1 << 30  # a case, config, record or baseline file is kilobytes to megabytes; 1 GiB is a mistake

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


class NotRegular(OSError):
    """The path names something other than a regular file; str() names the path and what it is."""

    def __init__(self, path, kind: str):
        super().__init__(errno.EINVAL, f"it is {kind}; allowed: a regular file", str(path))
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.filename} is {self.kind}, not a regular file"


def open_regular(path: Path, follow_symlinks: bool = True) -> BinaryIO:
    """`path` opened for binary reading, or NotRegular / OSError; never blocks.

    Checked before opening (opening a device can itself have effects) and again on the open file:
    O_NONBLOCK makes the open of a FIFO swapped in after the check return at once instead of
    waiting, and fstat then refuses it.
    """
    _check(os.stat(path, follow_symlinks=follow_symlinks).st_mode, path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        _check(os.fstat(fd).st_mode, path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check(mode: int, path: Path) -> None:
    if not stat.S_ISREG(mode):
        raise NotRegular(path, _KINDS.get(stat.S_IFMT(mode), "not a regular file"))


def read_bytes(path: str | Path, limit: int = MAX_BYTES) -> bytes:
    """The file's bytes; OSError if it is not a regular file or holds more than `limit` bytes."""
    with open_regular(Path(path)) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"it holds {size} bytes; allowed: at most {limit}", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew while we read
        raise OSError(errno.EFBIG, f"it holds over {limit} bytes; allowed: at most {limit}", str(path))
    return data


def read_text(path: str | Path, limit: int = MAX_BYTES) -> str:
    """The file as UTF-8 text (UnicodeDecodeError where it is not)."""
    return read_bytes(path, limit).decode("utf-8")


def check_regular(path: str | Path) -> None:
    """OSError unless `path` is a regular file, for a reader (numpy's memory map) that opens it itself."""
    open_regular(Path(path)).close()


def read_tail(path: Path, max_bytes: int) -> str:
    """The last max_bytes of a regular file as text, '...' in front where it was cut; OSError if unreadable."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size - max_bytes)
        f.seek(start)
        text = f.read(size - start).decode("utf-8", "replace")
    return "..." + text if start else text
