"""Why a launched program failed, in one line, from its log: the exception of the first rank that failed.

A program that parity does not instrument (torchtitan's trainer, a setup's own command) leaves only its
output. There, a failure reads as a Python traceback, whose last line (after any chained "direct cause"
tracebacks) names the exception, or as C++'s `terminate called after throwing an instance of 'T'` with
its `what():` line. torchrun prefixes each rank's lines with `[rankN]:` (or `[defaultN]:`), and when a rank
fails it prints a traceback of its own (ChildFailedError) and a summary: those say that a rank failed, not
why, and are never the cause. Of the ranks whose lines hold a failure, the one whose failure the log shows
first is taken: the others usually failed because it did.
"""

from __future__ import annotations

import re

RANK_PREFIX = re.compile(r"^\[(?:rank|default)(\d+)\]:\s?")
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("The above exception was the direct cause of the following exception:",
           "During handling of the above exception, another exception occurred:")
TERMINATE = re.compile(r"terminate called after throwing an instance of '([^']+)'")
WHAT = re.compile(r"^\s*what\(\):\s*(.*)")
LAUNCHER_ERRORS = ("ChildFailedError",)  # torchrun's own report that a child failed
MAX_CAUSE = 500  # characters: a cause is one line of a message, not a dump


def by_rank(text: str) -> list[tuple[list[int], list[str]]]:
    """The log's lines split per torchrun rank prefix (unprefixed lines together), each stream in log order
    with the position of each of its lines in the whole log."""
    streams: dict[str | None, tuple[list[int], list[str]]] = {}
    for n, line in enumerate(text.splitlines()):
        m = RANK_PREFIX.match(line)
        where, lines = streams.setdefault(m.group(1) if m else None, ([], []))
        where.append(n)
        lines.append(line[m.end():] if m else line)
    return list(streams.values())


def exception_line(lines: list[str], start: int) -> tuple[str | None, int]:
    """The exception line that ends the traceback starting at lines[start], following chained tracebacks to the
    last one; and the index where the search stopped."""
    found, i = None, start + 1
    while i < len(lines):
        line = lines[i]
        if line.strip() in CHAINED or line.startswith(TRACEBACK):
            i += 1
            continue
        if line and not line[0].isspace():
            found = line.strip()
            nxt = next((ln.strip() for ln in lines[i + 1:] if ln.strip()), "")
            if nxt not in CHAINED:
                return found, i
        i += 1
    return found, i


def stream_cause(lines: list[str]) -> tuple[str, int] | None:
    """The first failure in one rank's lines that is not the launcher's report of a child's failure, and the
    index of the line where it starts."""
    i = 0
    while i < len(lines):
        line = lines[i]
        terminate = TERMINATE.search(line)
        if terminate:
            what = next((m.group(1) for m in map(WHAT.match, lines[i + 1:i + 4]) if m), "")
            return (f"{terminate.group(1)}: {what}" if what else terminate.group(1)), i
        if line.startswith(TRACEBACK):
            start = i
            cause, i = exception_line(lines, i)
            if cause and not any(e in cause for e in LAUNCHER_ERRORS):
                return cause, start
        i += 1
    return None


def root_cause(text: str) -> str | None:
    """The cause of a failure logged in `text`, one line (at most MAX_CAUSE characters), or None."""
    found = []
    for where, lines in by_rank(text):
        hit = stream_cause(lines)
        if hit:
            found.append((where[hit[1]], hit[0]))
    if not found:
        return None
    cause = min(found)[1]
    return cause if len(cause) <= MAX_CAUSE else cause[:MAX_CAUSE - 1] + "…"
