"""Series and weights: two runs' step-wise metric, or final weights, compared entry by entry in two lanes.

- exact: every entry the same IEEE-754 double (parity.verdict.numbers.bitwise_equal); for weights, the
  sha256 of the full parameter tensors agree.
- tolerance: |other - ref| <= atol + rtol * |ref|, the reference value scaling the bound
  (spec.Tolerance.allows). NaN never passes. For weights, each parameter's norm and each of its
  sketches, the sketches bounded by atol + rtol * norm(ref) (see compare_weights).

NaN or Inf anywhere, and missing, extra, duplicated or out-of-order steps, are problems: a metric with a
problem fails. `first_not_bitwise` is the first entry that is not bitwise equal, `first_beyond_tolerance`
the first outside tolerance; max_abs/max_rel are over the finite entries only. Whole columns at a time:
a long run has 10^5 steps. Nothing here imports torch or reads files.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from parity.core.records import SKETCH_COLUMNS
from parity.case.schema import Tolerance
from parity.verdict.model import MetricResult
from parity.verdict.numbers import LISTED, bitwise_equal, differences, entry, span


def _index(keys, values, label: str, what: str, problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(keys, values), each key once (a repeated key keeps its place and its last value), recording
    duplicated, out-of-order and non-finite entries as problems."""
    keys, values = np.asarray(keys), np.asarray(values, dtype=np.float64)
    if len(keys) != len(values):
        problems.append(f"{label} has {len(keys)} {what}s but {len(values)} values")
        keys, values = keys[:len(values)], values[:len(keys)]
    if not (what == "step" and (keys[1:] > keys[:-1]).all()):  # strictly increasing steps: nothing to find
        out: dict = {}
        for k, v in zip(keys.tolist(), values.tolist()):
            if k in out:
                problems.append(f"{label} has {what} {k} twice")
            elif what == "step" and out and k < next(reversed(out)):
                problems.append(f"{label} steps are out of order: {k} after {next(reversed(out))}")
            out[k] = v
        keys, values = np.array(list(out), dtype=keys.dtype), np.fromiter(out.values(), np.float64, len(out))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        shown = [f"{k} ({v!r})" for k, v in zip(keys[bad[:LISTED]].tolist(), values[bad[:LISTED]].tolist())]
        problems.append(f"{label} has non-finite values at {what} {span(shown, bad.size)}")
    return keys, values


def _summarize(entry_at, exact: np.ndarray, within: np.ndarray, abs_: np.ndarray, rel: np.ndarray, mode: str,
               problems: list[str]) -> MetricResult:
    """The MetricResult from each entry's lanes (exact, within tolerance) and differences; `entry_at(i)` builds
    entry i, the first divergence and first tolerance failure being the only ones a verdict keeps."""
    n = len(exact)
    if n == 0 and not problems:
        problems.append("nothing to compare")
    bitwise = not problems and bool(exact.all())
    within_tolerance = not problems and bool(within.all())
    finite = np.isfinite(abs_)
    first_differing, first_failure = np.flatnonzero(~exact)[:1], np.flatnonzero(~within)[:1]
    return MetricResult(
        n=n,
        exact_equal_steps=int(exact.sum()),
        bitwise=bitwise,
        within_tolerance=within_tolerance,
        max_abs=max(abs_[finite].tolist(), default=0.0),
        max_rel=max(rel[finite].tolist(), default=0.0),
        failing_steps=int(n - within.sum()),
        first_not_bitwise=entry_at(int(first_differing[0])) if first_differing.size else None,
        first_beyond_tolerance=entry_at(int(first_failure[0])) if first_failure.size else None,
        passed=bitwise if mode == "bitwise" else within_tolerance,
        problems=problems,
    )


def compare_series(ref_steps, ref_values, other_steps, other_values, tol: Tolerance,
                   mode: str = "tolerance", labels=("reference", "other"), slack: dict | None = None,
                   unit: str | None = None) -> MetricResult:
    """One step-wise metric, compared step by step.

    `passed` follows `mode`: "bitwise" needs every step exact, "tolerance" every step within tol
    (plus `slack[step]`, the rounding of values read from printed text, where given). Whole
    columns at a time: a long run has 10^5 steps.
    """
    problems: list[str] = []
    ref_k, ref_v = _index(ref_steps, ref_values, labels[0], "step", problems)
    other_k, other_v = _index(other_steps, other_values, labels[1], "step", problems)
    shared, in_ref = np.isin(ref_k, other_k), np.isin(other_k, ref_k)
    if not shared.all():
        problems.append(f"{labels[1]} lacks steps {span(ref_k[~shared].tolist())} that {labels[0]} has")
    if not in_ref.all():
        problems.append(f"{labels[1]} has steps {span(other_k[~in_ref].tolist())} that {labels[0]} lacks")
    steps, ref_v = ref_k[shared], ref_v[shared]
    order = np.argsort(other_k, kind="stable")
    other_v = other_v[order[np.searchsorted(other_k, steps, sorter=order)]] if steps.size else ref_v[:0]
    exact = bitwise_equal(ref_v, other_v)
    diff, rel = differences(ref_v, other_v)
    with np.errstate(invalid="ignore", over="ignore"):
        if slack:
            allowance = np.fromiter((slack.get(s, 0.0) for s in steps.tolist()), np.float64, len(steps))
            within = np.isfinite(diff) & (diff <= tol.bound(ref_v) + allowance)
        else:
            within = np.isfinite(ref_v) & np.isfinite(other_v) & tol.allows(other_v, ref_v)

    def step_entry(i: int) -> dict:
        return entry("step", int(steps[i]), float(ref_v[i]), float(other_v[i]), unit)

    return _summarize(step_entry, exact, within, diff, rel, mode, problems)


def compare_weights(ref_rows, other_rows, tol: Tolerance, mode: str = "tolerance",
                    labels=("reference", "other"), unit: str | None = None) -> MetricResult:
    """Final weights, keyed by parameter name: exact = sha256 equal; tolerance = the L2 norms and
    the sketches (random projections, see parity.rank.digest.weight_sketches) within tolerance.

    A sketch's natural scale is the parameter's norm (a sketch value itself can be near zero), so
    each sketch must satisfy |other - ref| <= atol + rtol * norm(ref). A parameter whose sketch
    fails is reported by its worst sketch: {param, sketch: k, value_ref, value_other, abs, rel,
    ulps}, rel relative to the reference norm; otherwise by its norm, as before. The norm alone
    misses a sign flip or a permutation; the sketches do not.
    """
    problems: list[str] = []
    ref = _norms(ref_rows, labels[0], problems)
    other = _norms(other_rows, labels[1], problems)
    ref_sha = {r["param"]: r["sha256"] for r in ref_rows}
    other_sha = {r["param"]: r["sha256"] for r in other_rows}
    # weights.csv files written before the sketches existed lack their columns: such a pair is
    # judged on norms only, as it was then.
    sketched = all(c in r for r in (*ref_rows, *other_rows) for c in SKETCH_COLUMNS)
    ref_sketch = {r["param"]: [r[c] for c in SKETCH_COLUMNS] for r in ref_rows} if sketched else {}
    other_sketch = {r["param"]: [r[c] for c in SKETCH_COLUMNS] for r in other_rows} if sketched else {}
    missing = [p for p in ref if p not in other]
    extra = [p for p in other if p not in ref]
    if missing:
        problems.append(f"{labels[1]} lacks params {span(missing)}")
    if extra:
        problems.append(f"{labels[1]} has extra params {span(extra)}")
    keys = [p for p in ref if p in other]
    entries, within = [], []
    for p in keys:
        e = entry("param", p, ref[p], other[p], unit)
        ok = math.isfinite(ref[p]) and math.isfinite(other[p]) and tol.allows(other[p], ref[p])
        if sketched:
            bound = tol.bound(ref[p])
            diffs = [abs(b - a) for a, b in zip(ref_sketch[p], other_sketch[p])]
            # NaN compares false: a non-finite sketch is the worst and never within the bound.
            k = max(range(len(diffs)), key=lambda j: math.inf if math.isnan(diffs[j]) else diffs[j])
            if not all(d <= bound for d in diffs):
                ok = False
                e = {"param": p, "sketch": k, **entry("param", p, ref_sketch[p][k], other_sketch[p][k], unit)}
                e["rel"] = e["abs"] / abs(ref[p]) if ref[p] != 0.0 else (0.0 if e["abs"] == 0.0 else math.inf)
        entries.append(e)
        within.append(ok)
    exact = [ref_sha[p] == other_sha[p] and math.isfinite(ref[p]) and math.isfinite(other[p]) for p in keys]
    return _summarize(entries.__getitem__, np.array(exact, dtype=bool), np.array(within, dtype=bool),
                      np.array([e["abs"] for e in entries], dtype=np.float64),
                      np.array([e["rel"] for e in entries], dtype=np.float64), mode, problems)


def _norms(rows: list[dict], label: str, problems: list[str]) -> dict[str, float]:
    params, norms = _index([r["param"] for r in rows], [r["norm"] for r in rows], label, "param", problems)
    return dict(zip(params.tolist(), norms.tolist()))


def not_recorded(reason: str) -> MetricResult:
    """The weights lane of a pair where a setup's own command left no final weights: said, not failed."""
    return replace(not_compared(reason), within_tolerance=True, passed=True, problems=[], not_recorded=reason)


def rounding(columns: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """Per row, how far a recorded value may be from the true one: 0 unless read from rounded log text."""
    return columns.get(f"{metric}_rounding", np.zeros(len(columns["step"])))


def not_compared(reason: str) -> MetricResult:
    """A metric result for a metric that could not be compared; it never passes."""
    return MetricResult(n=0, exact_equal_steps=0, bitwise=False, within_tolerance=False, max_abs=0.0, max_rel=0.0,
                        failing_steps=0, first_not_bitwise=None, first_beyond_tolerance=None, passed=False,
                        problems=[f"not compared: {reason}"])
