"""The kinds of value a case file's keys take, each with its one-line "what is allowed".

A schema dataclass declares a key's default and its kind together (`declared`); the loader reads the
kind back (`kinds_of`) and checks the file's value against it. A kind's check returns the value as
the schema keeps it, or raises Problem with the text after `FILE: KEY: `.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

KIND = "kind"  # the dataclass field metadata key that holds a field's kind


class Problem(Exception):
    """What is wrong with one value, and what is allowed: the message after `FILE: KEY: `."""


@dataclass(frozen=True)
class Choice:
    allowed: tuple

    def check(self, value, case_dir: Path | None = None):
        if value not in self.allowed:
            raise Problem(f"{value!r} is not allowed; allowed: {', '.join(map(str, self.allowed))}")
        return value


@dataclass(frozen=True)
class Integer:
    minimum: int
    maximum: int | None = None

    def check(self, value, case_dir: Path | None = None):
        if (isinstance(value, bool) or not isinstance(value, int) or value < self.minimum
                or (self.maximum is not None and value > self.maximum)):
            allowed = (f"an integer >= {self.minimum}" if self.maximum is None
                       else f"an integer from {self.minimum} to {self.maximum}")
            raise Problem(f"{value!r} is not allowed; allowed: {allowed}")
        return value


@dataclass(frozen=True)
class Number:
    positive: bool = False  # > 0; otherwise >= 0

    def check(self, value, case_dir: Path | None = None) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (self.positive and value == 0):
            raise Problem(f"{value!r} is not allowed; allowed: a finite number {'> 0' if self.positive else '>= 0'}")
        return float(value)


@dataclass(frozen=True)
class Flag:
    def check(self, value, case_dir: Path | None = None) -> bool:
        if not isinstance(value, bool):
            raise Problem(f"{value!r} is not allowed; allowed: true, false")
        return value


@dataclass(frozen=True)
class Or:
    """One literal value with its own meaning (dp_shard = -1: fill from world_size), else the kind."""

    literal: object
    kind: object

    def check(self, value, case_dir: Path | None = None):
        return self.literal if value == self.literal else self.kind.check(value)


@dataclass(frozen=True)
class NpyFile:
    """A path, relative to the case file, of an existing .npy file; kept resolved."""

    def check(self, value, case_dir: Path | None = None) -> str:
        p = Path(case_dir or ".") / str(value)
        if not isinstance(value, str) or not value.endswith(".npy") or not p.is_file():
            raise Problem(f"{value!r} is not allowed; allowed: an existing .npy file of token ids")
        return str(p.resolve())


def declared(default, kind=None, **more):
    """A dataclass field with its default and the kind of value a case file may give it (None: never from a file)."""
    return field(default=default, metadata={KIND: kind} if kind is not None else {}, **more)


def kinds_of(cls) -> dict[str, object]:
    """{field name: kind} for the fields of a schema dataclass that a case file may set."""
    return {f.name: f.metadata[KIND] for f in fields(cls) if KIND in f.metadata}
