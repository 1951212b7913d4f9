"""A one-line progress display for running cases: case, setup, step i/N, elapsed.

It rewrites one line with `\\r` on a terminal and writes nothing otherwise, so logs, CI output
and captured pytest output stay clean.
"""

from __future__ import annotations

import shutil
import sys


class Progress:
    def __init__(self, stream=None):
        # Resolve sys.stderr at construction, not at import: pytest swaps it while capturing.
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self._width = 0  # length of the line on screen, so a shorter one can blank its tail

    def update(self, case: str, setup: str, step: int, total: int, elapsed: float) -> None:
        if not self.live:
            return
        line = f"{case} | {setup} | step {step}/{total} | {elapsed:.1f}s"
        # A line longer than the terminal wraps, and `\r` then only returns to the wrapped part.
        line = line[: max(10, shutil.get_terminal_size().columns - 1)]
        self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
        self.stream.flush()
        self._width = len(line)

    def done(self) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0
