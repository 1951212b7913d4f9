"""Numbers: how far apart two values are (ulps, bitwise equality, differences), and the Entry that says so.

Exact means the same IEEE-754 double, compared as 8-byte patterns: -0.0 and 0.0 are *not* equal (a sign
flip is a real numerical difference), and a non-finite value is never equal to anything, NaN included.
ULPs are counted in the precision the runs produced the values in (produced_unit), or else in the values' own
(ulp_unit). Nothing here imports torch or reads files.
"""

from __future__ import annotations

import math

import numpy as np

from parity.verdict.model import Entry

LISTED = 5  # how many keys a problem line names before "..."


def produced_unit(setups) -> str:
    """The ulp unit of the values a case's setups produce, from their training dtypes: "f64" when every setup
    trains in float64, else "f32". A float32 run's loss averaged over ranks in double, or a norm summed in double,
    is a float32 result, and a float64 ulp of it (10^-16 relative) would make a rounding difference read like a bug."""
    return "f64" if {s.train.dtype for s in setups} == {"float64"} else "f32"


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
    """ "3 f32 ulps": the count with its unit (entries from before units were recorded say plain "ulps"); two
    values that round to one float32 but are not the same double are "<1 f32 ulp" apart."""
    n, unit = e["ulps"], e.get("ulp_unit")
    count = "<1" if n == 0 and not bitwise_equal(e["value_ref"], e["value_other"]) else str(n)
    return f"{count} {unit + ' ' if unit else ''}ulp{'' if count in ('1', '<1') else 's'}"


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


def entry(key_name: str, key, ref: float, other: float, unit: str | None = None) -> Entry:
    """Entry {key_name: key, value_ref, value_other, abs, rel, ulps, ulp_unit} of two values, the ulps counted in
    `unit` (by default, ulp_unit of the two values)."""
    diff, rel = differences(ref, other)
    unit = unit or ulp_unit(ref, other)
    return {key_name: key, "value_ref": ref, "value_other": other, "abs": float(diff), "rel": float(rel),
            "ulps": ulps_apart(ref, other, unit), "ulp_unit": unit}


def short(x, digits: int = 3) -> str:
    """A float to `digits` significant digits that never reads as an integer: 3.0, 0.0021, 3.7e-08 (and NaN, inf
    or a non-float as they are)."""
    if not isinstance(x, float) or not math.isfinite(x):
        return str(x)
    text = f"{x:.{digits}g}"
    return text if any(c in text for c in ".e") else text + ".0"


def span(keys, count: int | None = None) -> str:
    """The first LISTED keys, and how many there are in all (`count`, when `keys` holds only the first ones)."""
    keys = list(keys[:LISTED]) if count is not None else list(keys)
    count = len(keys) if count is None else count
    shown = ", ".join(map(str, keys[:LISTED]))
    return shown + (f", ... ({count} in all)" if count > LISTED else "")
