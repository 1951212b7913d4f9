"""Text from disk, made inert in Markdown.

A report and a PR evidence block quote strings that a run directory holds: messages and names from
verdict.json, commands and versions from run.json. A run directory is input (copied from a
cluster, or made by hand), so such a string must not be able to add a link, an image, an HTML tag,
a table row, a heading or a closing code fence to what a reviewer reads. Each helper here renders
its text as exactly that text, on one line.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")
# Characters that start a link, an image, an HTML tag or entity, emphasis or a code span.
_ACTIVE = re.compile(r"([\\`*\[\]<>&])")
_ENTITY = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_BACKTICKS = re.compile(r"`+")


def one_line(text) -> str:
    """str(text) with line breaks and other control characters as spaces."""
    return _CONTROL.sub(" ", str(text))


def text(value) -> str:
    """Plain text: every character that Markdown would act on is escaped (a leading '#' too)."""
    s = _ACTIVE.sub(lambda m: _ENTITY.get(m.group(1), "\\" + m.group(1)), one_line(value))
    return "\\" + s if s.lstrip().startswith("#") else s


def cell(value) -> str:
    """text() for a table cell, where '|' would start the next cell."""
    return text(value).replace("|", "\\|")


def code(value) -> str:
    """An inline code span holding exactly `value` (on one line), whatever backticks it contains."""
    s = one_line(value)
    fence = "`" * (1 + max((len(run) for run in _BACKTICKS.findall(s)), default=0))
    pad = " " if s.startswith("`") or s.endswith("`") or not s.strip() else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def fence(lines: list[str], info: str = "") -> list[str]:
    """A fenced code block of `lines`, its fence longer than any run of backticks inside."""
    longest = max((len(run) for line in lines for run in _BACKTICKS.findall(line)), default=0)
    mark = "`" * max(3, longest + 1)
    return [mark + info, *lines, mark]
