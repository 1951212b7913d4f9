"""Opening files that someone else wrote, so that reading them can neither hang nor exhaust memory.

A path a training command or a case file leads us to (a metrics file, an event file, a log) is
input: it may be a FIFO, a socket or a device instead of a file. open() on a FIFO waits for a
writer, forever; a device may never end. So every such file is opened by open_regular(), and a log
that goes into a message is read from its end by read_tail(), never whole.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


class NotRegular(OSError):
    """The path names something other than a regular file; str() says what it is."""


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
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise NotRegular(f"{path} is {kind}, not a regular file")


def read_tail(path: Path, max_bytes: int) -> str:
    """The last max_bytes of a regular file as text, '...' in front where it was cut; OSError if unreadable."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size - max_bytes)
        f.seek(start)
        text = f.read(size - start).decode("utf-8", "replace")
    return "..." + text if start else text
