"""Option types and allowed values shared by the two front ends, `parity` (parity.cli) and the pytest
plugin (parity.plugin): one parser per value, so both read and refuse the same words."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from parity.case.schema import MAX_STEPS
from parity.verdict.update_modes import (  # noqa: F401  (the front ends' one import of them)
    HELP as UPDATE_HELP, METAVAR as UPDATE_METAVAR, UPDATE_MODES, WRITES_MISSING,
)


def positive(kind, maximum=None):
    """An argparse type: a finite number of `kind` above 0 (and at most `maximum`)."""
    def parse(value):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not math.isfinite(v) or v <= 0 or (maximum is not None and v > maximum):
            bound = f" and at most {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"{value!r} is not allowed; allowed: a finite number > 0{bound}")
        return v
    return parse


STEPS = positive(int, MAX_STEPS)
TIMEOUT = positive(float, 7 * 24 * 3600.0)  # a week: beyond it, a typo (and nan, inf would never fire)


def names_a_path(word: str, base: Path = Path(".")) -> bool:
    """Whether a word after a bare `--update-baselines` is a path (a pytest node id's file part too), not a mode."""
    return not word.startswith("-") and (base / word.split("::")[0]).exists()
