"""Numbers: how far apart two values are (ulps, bitwise equality, differences), and the Entry that says so.

Exact means the same IEEE-754 double, compared as 8-byte patterns: -0.0 and 0.0 are *not* equal (a sign
flip is a real numerical difference), and a non-finite value is never equal to anything, NaN included.
ULPs are counted in the values' own precision (ulp_unit). Nothing here imports torch or reads files.
"""

from __future__ import annotations

import math

import numpy as np

from parity.verdict.model import Entry

LISTED = 5  # how many keys a problem line names before "..."


def ulp_unit(a: float, b: float) -> str:
    """The precision two values are counted in: "f32" when both are float32 numbers, else "f64".

    A float32 grad norm widened to a double is exactly a float32 number; a loss averaged in double
    precision over ranks is not, and counting it in float32 units would call a real difference
    "0 ulps".
    """
    with np.errstate(over="ignore"):  # a double beyond float32's range is simply no float32 number
        exact32 = all(math.isfinite(x) and float(np.float32(x)) == x for x in (a, b))
    return "f32" if exact32 else "f64"


def ulps_apart(a: float, b: float, unit: str | None = None) -> int | None:
    """Distance between a and b in units in the last place of `unit` (default ulp_unit(a, b)).

    None if either is not finite (or does not fit the unit). Bit patterns are mapped onto a
    monotonic integer line (negative floats mirrored below zero, -0.0 == 0.0), so the distance
    counts the representable values between them.
    """
    unit = unit or ulp_unit(a, b)
    dtype, itype = (np.float32, np.int32) if unit == "f32" else (np.float64, np.int64)
    with np.errstate(over="ignore"):
        fa, fb = dtype(a), dtype(b)
    if not (np.isfinite(fa) and np.isfinite(fb)):
        return None
    return abs(_ordered(fa, itype) - _ordered(fb, itype))


def _ordered(x, itype) -> int:
    bits = int(np.array(x).view(itype))
    return bits if bits >= 0 else -(bits & int(np.iinfo(itype).max))


def ulps_text(e: dict) -> str:
    """ "3 f32 ulps": the count with its unit (entries from before units were recorded say plain "ulps")."""
    unit = e.get("ulp_unit")
    return f"{e['ulps']} {unit} ulps" if unit else f"{e['ulps']} ulps"


def bitwise_equal(a, b):
    """The same IEEE double (8-byte pattern) on both sides, and finite; element by element for arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    same = np.isfinite(a) & np.isfinite(b) & (a.view(np.int64) == b.view(np.int64))
    return same if same.ndim else bool(same)


def differences(ref, other) -> tuple[np.ndarray, np.ndarray]:
    """|other - ref|, and that relative to |ref| (0 where equal, inf against a zero reference); element by element."""
    ref, other = np.asarray(ref, dtype=np.float64), np.asarray(other, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.abs(other - ref)
        rel = np.where(diff == 0.0, 0.0, np.where(ref == 0.0, np.inf, diff / np.abs(ref)))
    return diff, rel


def entry(key_name: str, key, ref: float, other: float) -> Entry:
    """Entry {key_name: key, value_ref, value_other, abs, rel, ulps, ulp_unit} of two values."""
    diff, rel = differences(ref, other)
    unit = ulp_unit(ref, other)
    return {key_name: key, "value_ref": ref, "value_other": other, "abs": float(diff), "rel": float(rel),
            "ulps": ulps_apart(ref, other, unit), "ulp_unit": unit}


def span(keys, count: int | None = None) -> str:
    """The first LISTED keys, and how many there are in all (`count`, when `keys` holds only the first ones)."""
    keys = list(keys[:LISTED]) if count is not None else list(keys)
    count = len(keys) if count is None else count
    shown = ", ".join(map(str, keys[:LISTED]))
    return shown + (f", ... ({count} in all)" if count > LISTED else "")
