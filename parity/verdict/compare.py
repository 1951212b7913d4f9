"""Verdicts: the reference setup of a case against every other setup, metric by metric.

Every metric gets two lanes side by side, whatever the case's mode:

- exact: the two values are the same IEEE-754 double, compared as 8-byte patterns. So -0.0 and
  0.0 are *not* equal (a sign flip is a real numerical difference), and a non-finite value is
  never equal to anything, NaN included, because NaN/Inf always fail (see below). For weights,
  exact means the sha256 of the full parameter tensors agree.
- tolerance: |other - ref| <= atol + rtol * |ref|, the reference value scaling the bound
  (spec.Tolerance.allows). NaN never passes. For weights, each parameter's norm and each of its
  sketches, the sketches bounded by atol + rtol * norm(ref) (see compare_weights).

NaN or Inf anywhere, and missing, extra, duplicated or out-of-order steps, are *problems*: a
metric with a problem fails, and a pair with a problem fails whatever the case expects. A
negative control (outcome "diverge") must show a numerical divergence between two healthy
runs; a crash, a missing file or a NaN is not the divergence it is looking for.

The verdict, `<out>/<case>/verdict.json` (a contract for the plugin, CLI and reports):

    {case, passed, mode, outcome, reference, platform, device, backend, notes: [str],
     tolerance: {loss|grad_norm|weights|forward|backward|update: {rtol, atol, source}},
     repeat: null | P (the reference against its repeat run, always bitwise),
     statistical: null | S (mode "statistical" only),
     pairs: [P], baselines: [B (see baselines.py)], problems: [str]}
    P = {reference, other, passed, problems: [str], notes: [str],
         diverged: null | {metric, step, param, value_ref, value_other, abs, rel, ulps, ulp_unit},
         metrics: {loss: M, grad_norm: M, weights: M}, modes: {loss|grad_norm|weights: mode},
         localization: L}
    L = {probed, mode, first: null | E, before: [E], agree_until, steps: [int], problems: [str], line}
    E = {step, phase, name, stat, value_ref, value_other, abs, rel, ulps, ulp_unit}
    M = {n, exact_equal_steps, bitwise, within_tolerance, max_abs, max_rel, failing_steps,
         first_divergence, first_tolerance_failure, passed, problems[, not_recorded: str]}

In mode "statistical" (parity.verdict.ensemble) the step lanes are computed within tolerance, for
information, and a step metric's `passed` is the ensemble test's: its M also holds `statistical`, T.
The weights lane is not compared (runs that drift apart have no band for their final weights).

    S = {members: [name], k, perturb, window, alpha, metrics, tests, limit, window_ends: [step],
         bands: {loss|grad_norm: {mean, sd, sd_used, low, high: [per window], members: {name: [...]}}},
         windows_at_floor: {metric: int}, held_out: [{member, passed, max_abs_z_over_limit}],
         reference: {metric: T}}
    T = {passed, values: [per window], z: [per window], max_abs_z, failing_windows,
         first_failure: null | {step, window: [first, last], value_ref (the ensemble's mean), value_other,
                                abs, rel, z, limit}}

`modes` is the case's mode per metric, except where a setup's values were read from rounded log
text (metrics.csv `<metric>_rounding`, see parity.trainers.readers): that metric is compared
within tolerance, each step's allowance widened by the two runs' rounding at that step, and a
note says so. `not_recorded` marks a weights lane that a command setup gave no weights for: it
passes, and the verdict says "not compared" (a built-in run's missing weights.csv still fails).

`localization` (parity.verdict.localize) is where the two runs' probes (probes.csv) first part, in causal
order, under the case's mode (in tolerance mode with the tolerance of the entry's phase,
forward|backward|update in the `tolerance` block). It informs; it changes a pair's verdict only
where a rule says so: (a) a negative control with `[expect] localized = {step, phase, name}` fails unless `first` is
exactly there; (b) in a "match" pair whose metrics all pass and whose runs both recorded probes,
the probes are a checked lane: a divergence or a probe problem is a pair problem "probes: ...".
A run without probes.csv (another trainer, an older run) gives probed false and no problem.

`first_divergence` is the first entry that is not bitwise equal, `first_tolerance_failure` the
first outside tolerance; each is {step (or param), value_ref, value_other, abs, rel, ulps, ulp_unit}
(ulps counted in the values' own precision, ulp_unit "f32" or "f64": see ulp_unit). A weights
entry of a parameter whose sketch failed also has `sketch` (which one, 0-based) and gives that
sketch's values, with rel relative to the reference norm; `diverged` then carries it too.
The repeat check comes first: when the run directory holds `<reference>.repeat` (the reference
run a second time in the same launch), the two must be bitwise equal, or the case fails with
"nondeterministic reference": then no bitwise verdict between setups means anything.

`M.passed` means "matches under the case's mode"; `pair.passed` applies the outcome on top (for
"diverge" it is true when some metric does not match). `problems` lists every reason a pair or
the case fails, so `passed == not problems`. `diverged` is set whenever something diverged,
whatever the outcome. max_abs/max_rel are over the finite entries only.

This module reads files and numbers only; it never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from parity.core.paths import inside
from parity.core.records import PROBE_PHASES, SKETCH_COLUMNS, RecordError, read_json, read_setup_run, write_json
from parity.case.spec import REPEAT_SUFFIX, Case, Tolerance, default_tolerances

STEP_METRICS = ("loss", "grad_norm")
LISTED = 5  # how many steps a problem line names before "..."


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


def _differences(ref, other) -> tuple[np.ndarray, np.ndarray]:
    """|other - ref|, and that relative to |ref| (0 where equal, inf against a zero reference); element by element."""
    ref, other = np.asarray(ref, dtype=np.float64), np.asarray(other, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.abs(other - ref)
        rel = np.where(diff == 0.0, 0.0, np.where(ref == 0.0, np.inf, diff / np.abs(ref)))
    return diff, rel


def _entry(key_name: str, key, ref: float, other: float) -> dict:
    diff, rel = _differences(ref, other)
    unit = ulp_unit(ref, other)
    return {key_name: key, "value_ref": ref, "value_other": other, "abs": float(diff), "rel": float(rel),
            "ulps": ulps_apart(ref, other, unit), "ulp_unit": unit}


def _span(keys, count: int | None = None) -> str:
    """The first LISTED keys, and how many there are in all (`count`, when `keys` holds only the first ones)."""
    keys = list(keys[:LISTED]) if count is not None else list(keys)
    count = len(keys) if count is None else count
    shown = ", ".join(map(str, keys[:LISTED]))
    return shown + (f", ... ({count} in all)" if count > LISTED else "")


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
        problems.append(f"{label} has non-finite values at {what} {_span(shown, bad.size)}")
    return keys, values


def _summarize(entry, exact: np.ndarray, within: np.ndarray, abs_: np.ndarray, rel: np.ndarray, mode: str,
               problems: list[str]) -> dict:
    """M from each entry's lanes (exact, within tolerance) and differences; `entry(i)` builds entry i, the
    first divergence and first tolerance failure being the only ones a verdict keeps."""
    n = len(exact)
    if n == 0 and not problems:
        problems.append("nothing to compare")
    bitwise = not problems and bool(exact.all())
    within_tolerance = not problems and bool(within.all())
    finite = np.isfinite(abs_)
    first_divergence, first_failure = np.flatnonzero(~exact)[:1], np.flatnonzero(~within)[:1]
    return {
        "n": n,
        "exact_equal_steps": int(exact.sum()),
        "bitwise": bitwise,
        "within_tolerance": within_tolerance,
        "max_abs": max(abs_[finite].tolist(), default=0.0),
        "max_rel": max(rel[finite].tolist(), default=0.0),
        "failing_steps": int(n - within.sum()),
        "first_divergence": entry(int(first_divergence[0])) if first_divergence.size else None,
        "first_tolerance_failure": entry(int(first_failure[0])) if first_failure.size else None,
        "passed": bitwise if mode == "bitwise" else within_tolerance,
        "problems": problems,
    }


def compare_series(ref_steps, ref_values, other_steps, other_values, tol: Tolerance,
                   mode: str = "tolerance", labels=("reference", "other"), slack: dict | None = None) -> dict:
    """One step-wise metric; returns the metric result M (see the module docstring).

    `passed` follows `mode`: "bitwise" needs every step exact, "tolerance" every step within tol
    (plus `slack[step]`, the rounding of values read from printed text, where given). Whole
    columns at a time: a long run has 10^5 steps.
    """
    problems: list[str] = []
    ref_k, ref_v = _index(ref_steps, ref_values, labels[0], "step", problems)
    other_k, other_v = _index(other_steps, other_values, labels[1], "step", problems)
    shared, in_ref = np.isin(ref_k, other_k), np.isin(other_k, ref_k)
    if not shared.all():
        problems.append(f"{labels[1]} lacks steps {_span(ref_k[~shared].tolist())} that {labels[0]} has")
    if not in_ref.all():
        problems.append(f"{labels[1]} has steps {_span(other_k[~in_ref].tolist())} that {labels[0]} lacks")
    steps, ref_v = ref_k[shared], ref_v[shared]
    order = np.argsort(other_k, kind="stable")
    other_v = other_v[order[np.searchsorted(other_k, steps, sorter=order)]] if steps.size else ref_v[:0]
    exact = bitwise_equal(ref_v, other_v)
    diff, rel = _differences(ref_v, other_v)
    with np.errstate(invalid="ignore", over="ignore"):
        if slack:
            allowance = np.fromiter((slack.get(s, 0.0) for s in steps.tolist()), np.float64, len(steps))
            within = np.isfinite(diff) & (diff <= tol.bound(ref_v) + allowance)
        else:
            within = np.isfinite(ref_v) & np.isfinite(other_v) & tol.allows(other_v, ref_v)

    def entry(i: int) -> dict:
        return _entry("step", int(steps[i]), float(ref_v[i]), float(other_v[i]))

    return _summarize(entry, exact, within, diff, rel, mode, problems)


def compare_weights(ref_rows, other_rows, tol: Tolerance, mode: str = "tolerance",
                    labels=("reference", "other")) -> dict:
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
        problems.append(f"{labels[1]} lacks params {_span(missing)}")
    if extra:
        problems.append(f"{labels[1]} has extra params {_span(extra)}")
    keys = [p for p in ref if p in other]
    entries, within = [], []
    for p in keys:
        e = _entry("param", p, ref[p], other[p])
        ok = math.isfinite(ref[p]) and math.isfinite(other[p]) and tol.allows(other[p], ref[p])
        if sketched:
            bound = tol.bound(ref[p])
            diffs = [abs(b - a) for a, b in zip(ref_sketch[p], other_sketch[p])]
            # NaN compares false: a non-finite sketch is the worst and never within the bound.
            k = max(range(len(diffs)), key=lambda j: math.inf if math.isnan(diffs[j]) else diffs[j])
            if not all(d <= bound for d in diffs):
                ok = False
                e = {"param": p, "sketch": k, **_entry("param", p, ref_sketch[p][k], other_sketch[p][k])}
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


def not_recorded(reason: str) -> dict:
    """The weights lane of a pair where a setup's own command left no final weights: said, not failed."""
    return {**not_compared(reason), "within_tolerance": True, "passed": True, "problems": [], "not_recorded": reason}


def rounding(columns: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """Per row, how far a recorded value may be from the true one: 0 unless read from rounded log text."""
    return columns.get(f"{metric}_rounding", np.zeros(len(columns["step"])))


def not_compared(reason: str) -> dict:
    """A metric result for a metric that could not be compared; it never passes."""
    return {"n": 0, "exact_equal_steps": 0, "bitwise": False, "within_tolerance": False, "max_abs": 0.0,
            "max_rel": 0.0, "failing_steps": 0, "first_divergence": None, "first_tolerance_failure": None,
            "passed": False, "problems": [f"not compared: {reason}"]}


def _load_run(directory: Path, name: str) -> dict:
    """A setup's records (records.read_setup_run, strict), with a problem line if its run did not finish.

    A setup whose run failed is a problem of the verdict (exit 1); records that are missing or
    malformed where the run says it finished are bad input (RecordError, exit 2).
    """
    run = {**read_setup_run(directory), "problems": []}
    status = run["info"]["status"]
    if status != "ok":
        message = run["info"].get("message")  # written by the runner for failed / timed-out setups
        detail = str(message).splitlines()[0] if message else None
        run["problems"].append(f"{name}: run status is {status!r}" + (f": {detail}" if detail else ""))
    return run


def _mismatch(metric: str, m: dict, mode: str) -> str:
    unit = "params" if metric == "weights" else "steps"
    if mode == "statistical":
        t = m["statistical"]
        return (f"{metric}: {t['failing_windows']} of {len(t['z'])} windows outside the ensemble's band; first at "
                f"{band_text(t['first_failure'])}")
    if mode == "bitwise":
        how = "have another sha256" if metric == "weights" else "differ bitwise"
        e, text = m["first_divergence"], f"{m['n'] - m['exact_equal_steps']} of {m['n']} {unit} {how}"
    else:
        e, text = m["first_tolerance_failure"], f"{m['failing_steps']} of {m['n']} {unit} outside tolerance"
    return f"{metric}: {text}; first at {entry_text(e)}"


def entry_text(e: dict) -> str:
    """Where an entry is and both values: "step 4: 1.25 vs 1.2500001 (abs 1e-07, rel 8e-08, 3 f32 ulps)"."""
    return f"{_where(e)}: {e['value_ref']!r} vs {e['value_other']!r} (abs {e['abs']:.3g}, rel {e['rel']:.3g}, " \
           f"{ulps_text(e)})"


def _where(e: dict) -> str:
    if e.get("param") is not None:  # a pair's `diverged` at a step carries "param": None
        return f"param {e['param']}" + (f" sketch{e['sketch']}" if "sketch" in e else "")
    return f"step {e['step']}"


def band_text(e: dict) -> str:
    """Where a window leaves the band: "steps 26-50: 3.2154 vs ensemble mean 3.1002 (rel 0.0372, z 41.3, limit 7.02)"."""
    return (f"steps {e['window'][0]}-{e['window'][1]}: {e['value_other']!r} vs ensemble mean {e['value_ref']!r} "
            f"(rel {e['rel']:.3g}, z {e['z']:.3g}, limit {e['limit']:.3g})")


def _first(m: dict, mode: str) -> dict | None:
    if mode == "statistical":
        return (m.get("statistical") or {}).get("first_failure")
    return m["first_divergence"] if mode == "bitwise" else m["first_tolerance_failure"]


def _diverged(metrics: dict, modes: dict) -> dict | None:
    """Earliest divergent step across loss and grad_norm (loss first on a tie); else weights."""
    firsts = [(i, name, _first(metrics[name], modes[name])) for i, name in enumerate(STEP_METRICS)]
    found = [(e["step"], i, name, e) for i, name, e in firsts if e is not None]
    if found:
        _, _, name, e = min(found, key=lambda t: t[:2])
        return {"metric": name, "step": e["step"], "param": None, **{k: v for k, v in e.items() if k != "step"}}
    e = _first(metrics["weights"], modes["weights"])
    if e is not None:
        return {"metric": "weights", "step": None, **e}
    return None


def compare_pair(ref_name: str, ref_run: dict, other_name: str, other_run: dict, case: Case,
                 statistical: dict | None = None) -> dict:
    """The reference against one other setup. In statistical mode `statistical` is parity.verdict.ensemble.evaluate's
    result: the step lanes are computed within tolerance, for information, and the ensemble test decides."""
    mode, outcome, tol = case.expect.mode, case.expect.outcome, case.expect.tolerance
    lanes = "tolerance" if mode == "statistical" else mode  # how the step lanes compare
    labels = (ref_name, other_name)
    problems = ref_run["problems"] + other_run["problems"]
    metrics, modes, notes = {}, {"weights": mode}, []
    for metric in STEP_METRICS:
        a, b = ref_run["metrics"], other_run["metrics"]
        modes[metric] = lanes
        if a is None or b is None:
            metrics[metric] = not_compared("metrics.csv unreadable")
            continue
        slack = None
        ra, rb = rounding(a, metric), rounding(b, metric)
        if ra.any() or rb.any():  # NaN counts as rounding here, and then fails every bound it widens
            ra, rb = dict(zip(a["step"].tolist(), ra.tolist())), dict(zip(b["step"].tolist(), rb.tolist()))
            slack = {s: ra.get(s, 0.0) + rb.get(s, 0.0) for s in ra.keys() | rb.keys()}
            # Values read from rounded log text carry no bits to compare: within tolerance plus each step's rounding.
            modes[metric] = "tolerance"
            notes.append(f"{metric}: recorded from rounded log text, so compared within tolerance with each step's "
                         f"atol widened by its rounding (at most {max(slack.values()):.3g}), not {mode}")
        metrics[metric] = compare_series(a["step"], a[metric], b["step"], b[metric], tol[metric], modes[metric], labels,
                                         slack)
        problems += [f"{metric}: {p}" for p in metrics[metric]["problems"]]
        if mode == "statistical":  # the lanes inform; whether the setup stays in the ensemble's band decides
            test = (statistical or {}).get("tests", {}).get(other_name, {}).get(metric)
            metrics[metric] = {**metrics[metric], "passed": bool(test and test["passed"]), "statistical": test}
            modes[metric] = mode
            if test is None:
                problems.append(f"{metric}: not tested: the ensemble has no band (see the case's problems)")
    unrecorded = [name for name, run in zip(labels, (ref_run, other_run))
                  if run["info"].get("status") == "ok" and run["info"].get("weights_recorded") is False]
    if mode == "statistical":
        metrics["weights"] = not_recorded("statistical mode judges loss and grad norm per window; the final weights "
                                          "of runs that drift apart have no band")
    elif unrecorded:
        metrics["weights"] = not_recorded(f"{', '.join(unrecorded)} recorded no final weights (its command "
                                          "setup names no `weights`)")
    elif ref_run["weights"] is None or other_run["weights"] is None:
        metrics["weights"] = not_compared("weights.csv unreadable")
    else:
        metrics["weights"] = compare_weights(ref_run["weights"], other_run["weights"], tol["weights"], mode, labels)
        problems += [f"weights: {p}" for p in metrics["weights"]["problems"]]
    healthy = not problems  # both runs finished and every record was comparable
    if not problems:
        differing = [name for name, m in metrics.items() if not m["passed"]]
        if outcome == "match":
            problems += [_mismatch(name, metrics[name], modes[name]) for name in differing]
        elif not differing:
            problems.append(f"expected a divergence (negative control), but every metric matches ({mode})")
    diverged = _diverged(metrics, modes)
    want = case.expect.first_divergence
    effect = None
    if not problems and outcome == "diverge" and want and diverged:
        # A control must be caught for the right reason: the planted bug's metric, at its step,
        # by the size of effect it plants.
        found = (diverged["metric"], diverged.get("step"))
        if found != (want["metric"], want["step"]):
            problems.append(f"expected the first divergence on {want['metric']} at step {want['step']}, "
                            f"found it on {found[0]} at step {found[1]}")
        else:
            effect = _effect(diverged, want)
            problems += effect["problems"]
    localization = _localization(ref_run, other_run, case, labels)
    if healthy and mode != "statistical":  # probes part at the first rounding difference, which this mode expects
        problems += _probe_problems(localization, case, metrics_passed=not problems)
    return {"reference": ref_name, "other": other_name, "passed": not problems, "problems": problems,
            "diverged": diverged, "effect": effect, "metrics": metrics, "modes": modes, "notes": notes,
            "localization": localization}


def probe_tolerances(case: Case) -> dict[str, Tolerance]:
    """Each probe phase's tolerance: the case's, else the default for its dtype (a hand-built Expect may lack them)."""
    defaults = default_tolerances(case.setups)[1]
    return {phase: case.expect.tolerance.get(phase, defaults[phase]) for phase in PROBE_PHASES}


def _localization(ref_run: dict, other_run: dict, case: Case, labels) -> dict:
    from parity.verdict.localize import localize  # it builds on this module's entries; imported here, not in a cycle

    mode = "tolerance" if case.expect.mode == "statistical" else case.expect.mode
    return localize(ref_run["probes"], other_run["probes"], mode, probe_tolerances(case), labels)


def _probe_problems(loc: dict, case: Case, metrics_passed: bool) -> list[str]:
    """The two rules by which probes change a pair's verdict (see the module docstring)."""
    want = case.expect.localized
    if case.expect.outcome == "diverge" and want:
        first = loc["first"]
        found = (f"{_probe_where(first)} (rel {first['rel']:.3g})" if first
                 else f"no divergence ({loc['line']})")
        if first is None or (first["step"], first["phase"], first["name"]) != (want["step"], want["phase"], want["name"]):
            return [f"expected the divergence localized at {_probe_where(want)}; found {found}"]
        return []
    if case.expect.outcome == "match" and metrics_passed and loc["probed"]:
        return [f"probes: {p}" for p in loc["problems"]] + ([f"probes: {loc['line']}"] if loc["first"] else [])
    return []


def _probe_where(e: dict) -> str:
    return f"step {e['step']}, {e['phase']}, {e['name']}"


def _effect(diverged: dict, want: dict) -> dict:
    """The observed size of a control's divergence against the size its case declares."""
    ref, other = diverged["value_ref"], diverged["value_other"]
    ratio = other / ref if ref != 0 else math.inf
    where = f"{want['metric']} at step {want['step']}"
    problems = []
    if "ratio" in want:
        low, high = want["ratio"] * (1 - want["within"]), want["ratio"] * (1 + want["within"])
        if not low <= ratio <= high:
            problems.append(f"expected {where} to be x{want['ratio']!r} the reference (within {want['within']:.3g}), "
                            f"found x{ratio:.9g} ({ref!r} vs {other!r})")
    elif not diverged["rel"] >= want["min_rel"]:
        problems.append(f"expected {where} to differ by at least {want['min_rel']:.3g} relative, found "
                        f"{diverged['rel']:.3g}: too small to be the planted effect")
    return {"expected": {k: v for k, v in want.items() if k not in ("metric", "step")}, "ratio": ratio,
            "rel": diverged["rel"], "problems": problems}


def _repeat_cause(pair: dict, run_problems: list[str]) -> str | None:
    """The cause line of a failed repeat check (None if it passed)."""
    if pair["passed"]:
        return None
    d = pair["diverged"]
    if run_problems or d is None or any(m["problems"] for m in pair["metrics"].values()):
        return "repeat check: " + "; ".join(pair["problems"])
    where = f"step {d['step']}" if d["step"] is not None else f"param {d['param']}"
    return (f"nondeterministic reference: {pair['reference']} run twice in one launch differs first at {where} "
            f"on {d['metric']} ({d['value_ref']!r} vs {d['value_other']!r}); until that is fixed no bitwise "
            "verdict between setups means anything")


def load_runs(case: Case, run_dir: str | Path) -> dict[str, dict]:
    """Every setup's records (see _load_run), ensemble members' too, by name: read once, then judged between
    setups and against baselines."""
    return {s.name: _load_run(Path(run_dir) / case.name / s.name, s.name) for s in (*case.setups, *case.ensemble)}


def compare_case(case: Case, run_dir: str | Path, baselines: list[dict] | None = None,
                 runs: dict[str, dict] | None = None) -> dict:
    """The verdict of one case from the runs under run_dir/<case>/ (and baseline checks, if given);
    `runs` is load_runs(case, run_dir) where the caller has read them already."""
    base = Path(run_dir) / case.name
    runs = runs if runs is not None else load_runs(case, run_dir)
    ref = case.reference.name
    repeat = None
    if (base / (ref + REPEAT_SUFFIX)).is_dir():
        bitwise = replace(case, expect=replace(case.expect, mode="bitwise", outcome="match", first_divergence=None,
                                               localized=None))
        name = ref + REPEAT_SUFFIX
        again = _load_run(base / name, name)
        repeat = compare_pair(ref, runs[ref], name, again, bitwise)
        repeat["cause"] = _repeat_cause(repeat, runs[ref]["problems"] + again["problems"])
    statistical = _statistical(case, runs)
    pairs = [compare_pair(ref, runs[ref], s.name, runs[s.name], case, statistical) for s in case.setups[1:]]
    problems = [repeat["cause"]] if repeat and repeat["cause"] else []
    problems += statistical["problems"] if statistical else []
    problems += [f"{p['reference']} vs {p['other']}: {line}" for p in pairs for line in p["problems"]]
    info = runs[ref]["info"] or {}
    verdict = {
        "case": case.name,
        "passed": not problems,
        "mode": case.expect.mode,
        "outcome": case.expect.outcome,
        "reference": ref,
        "platform": info.get("platform", "unknown"),
        "device": info.get("device", "unknown"),
        "backend": info.get("backend", "unknown"),
        "tolerance": _tolerances(case),
        "repeat": repeat,
        "statistical": statistical and statistical["summary"],
        "pairs": pairs,
        "baselines": [],
        "problems": problems,
        "notes": _case_file_notes(case, runs),
    }
    return with_baselines(verdict, baselines or [])


def _tolerances(case: Case) -> dict:
    return {m: {"rtol": t.rtol, "atol": t.atol, "source": case.expect.tolerance_source.get(m, "case")}
            for m, t in case.expect.tolerance.items()}


def unjudged_verdict(case: Case, problem: str) -> dict:
    """A failing verdict for a case that could not be judged (its records or a baseline could not be read,
    the disk refused a write): `problem` says why, in one line."""
    return {"case": case.name, "passed": False, "mode": case.expect.mode, "outcome": case.expect.outcome,
            "reference": case.reference.name, "platform": "unknown", "device": "unknown", "backend": "unknown",
            "tolerance": _tolerances(case), "repeat": None, "statistical": None, "pairs": [], "baselines": [],
            "problems": [problem], "notes": []}


def _statistical(case: Case, runs: dict) -> dict | None:
    """Statistical mode's ensemble and tests (parity.verdict.ensemble.evaluate), with the reference's own test in the
    summary: a reference outside its own ensemble's band means the band cannot be trusted (a problem)."""
    from parity.verdict import ensemble  # numbers only; imported where used, as the mode is rare

    st = case.expect.statistical
    if st is None:
        return None
    ref = runs[case.reference.name]
    steps = ref["metrics"]["step"] if ref["metrics"] is not None else np.array([], dtype=np.int64)
    result = ensemble.evaluate(st, case.expect.tolerance, steps, {m.name: runs[m.name] for m in case.ensemble},
                               {s.name: runs[s.name] for s in case.setups})
    own = result["tests"].get(case.reference.name)
    result["summary"]["reference"] = own
    problems = [f"ensemble: {p}" for p in result["problems"]]
    for metric, t in (own or {}).items():
        if not t["passed"] and not ref["problems"]:
            problems.append(f"the reference {case.reference.name} leaves its own ensemble's band on {metric} at "
                            f"{band_text(t['first_failure'])}: the members do not vary as the reference's own "
                            "rounding does, so the band cannot judge")
    return {**result, "problems": problems}


def with_baselines(verdict: dict, baselines: list[dict]) -> dict:
    """The verdict with the baseline checks added: each failing one is a problem of the case."""
    problems = verdict["problems"] + [f"baseline {b['setup']}: {b['message']}" for b in baselines if not b["passed"]]
    return {**verdict, "passed": not problems, "baselines": list(baselines), "problems": problems}


def _case_file_notes(case: Case, runs: dict) -> list[str]:
    """Say so when the runs were made from another version of the case file than the one judging them.

    Not a failure: re-judging a run with edited tolerances is a normal use. But the reader must know.
    """
    made_from = {r["info"].get("case_sha256") for r in runs.values()} - {case.sha256}
    if not made_from:
        return []
    if None in made_from:
        return [f"the runs do not record their case file's sha256: cannot tell whether they were made from {case.path}"]
    shown = ", ".join(sorted(str(h)[:12] for h in made_from))
    return [f"the runs were made from another version of {case.path} (case sha256 {shown}…, now "
            f"{case.sha256[:12]}…): judged against the file as it is now"]


def verdict_path(run_dir: str | Path, case_name: str) -> Path:
    return inside(run_dir, case_name, "verdict.json")


def write_verdict(run_dir: str | Path, verdict: dict) -> Path:
    path = verdict_path(run_dir, verdict["case"])
    write_json(path, verdict)
    return path


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _metric_line(name: str, m: dict) -> str:
    if "not_recorded" in m:
        return f"{name:<10} not compared: {m['not_recorded']}"
    unit = "params" if name == "weights" else "steps"
    line = f"{name:<10} exact {m['exact_equal_steps']}/{m['n']} {unit}, max abs {_g(m['max_abs'])}, " \
           f"max rel {_g(m['max_rel'])}, outside tolerance {m['failing_steps']}"
    e = m["first_divergence"]
    # Problems are listed once, under the pair.
    line += f", first divergence {_where(e)} ({ulps_text(e)})" if e else ", no divergence"
    t = m.get("statistical")
    if t:
        line += (f"; ensemble: max |z| {_g(t['max_abs_z'])}, {t['failing_windows']} of {len(t['z'])} windows "
                 "outside the band")
    return line


def format_verdict(verdict: dict) -> str:
    """A short human summary: per pair and metric both lanes, the tolerances used, the baselines."""
    v = verdict
    lines = [f"{v['case']}: {'PASS' if v['passed'] else 'FAIL'} on {ran_on(v)} (mode {v['mode']}, "
             f"outcome {v['outcome']}, reference {v['reference']}, platform {v['platform']})"]
    lines.append("  tolerance: " + "; ".join(f"{m} rtol={t['rtol']!r} atol={t['atol']!r} ({t['source']})"
                                            for m, t in v["tolerance"].items()))
    lines += [f"  note: {n}" for n in v.get("notes", [])]
    lines += ensemble_lines(v.get("statistical"))
    r = v.get("repeat")
    if r is not None:
        lines.append(f"  repeat check ({r['reference']} twice, bitwise): "
                     + ("PASS" if r["passed"] else "FAIL: " + r["cause"]))
        if not r["passed"]:
            lines += _localization_lines(r, "    ")  # which module is nondeterministic, where probes say
    for p in v["pairs"]:
        d = p["diverged"]
        where = "" if d is None else f"; first diverged: {d['metric']} at " + (
            f"step {d['step']}" if d["step"] is not None else f"param {d['param']}")
        lines.append(f"  {p['reference']} vs {p['other']}: {'PASS' if p['passed'] else 'FAIL'}{where}")
        lines += [f"    {_metric_line(name, m)}" for name, m in p["metrics"].items()]
        lines += _localization_lines(p, "    ")
        lines += [f"    note: {line}" for line in p.get("notes", [])]
        lines += [f"    - {line}" for line in p["problems"]]
    for b in v["baselines"]:
        lines.append(f"  baseline {b['setup']} [{b['platform']}, {b['how']}]: {b['status']}"
                     f"{'' if b['passed'] else ' FAIL'}: {b['message']}")
    return "\n".join(lines)


def statistical_tests(verdict: dict) -> dict[str, dict]:
    """A statistical verdict's tests by setup, {setup: {metric: T or None}}: the reference's own first, then
    each pair's other setup."""
    out = {verdict["reference"]: verdict["statistical"].get("reference") or {}}
    for p in verdict.get("pairs", []):
        out[p["other"]] = {m: (p["metrics"].get(m) or {}).get("statistical") for m in STEP_METRICS}
    return out


def ensemble_lines(st: dict | None) -> list[str]:
    """Statistical mode: the ensemble, the test's limit, how many windows the tolerance floor decided, the
    reference's own test and the held-out members' (a measured false-alarm count)."""
    if not st:
        return []
    windows = len(st["window_ends"])
    floor = ", ".join(f"{m} {n}/{windows}" for m, n in st["windows_at_floor"].items()) or "—"
    lines = [f"  ensemble: {st['k']} members ({st['perturb']} perturbed), windows of {st['window']} steps, "
             f"alpha {st['alpha']!r} over {st['tests']} tests: |z| limit {st['limit']:.3g}; windows where the "
             f"tolerance floors the spread: {floor}"]
    ref = st.get("reference")
    if ref:
        lines.append("  reference in its own band: " + ", ".join(
            f"{m} max |z| {_g(t['max_abs_z'])}" + ("" if t["passed"] else " (OUTSIDE)") for m, t in ref.items()))
    held = st.get("held_out") or []
    if held:
        out = [h["member"] for h in held if not h["passed"]]
        lines.append(f"  held-out members (each against the other {st['k'] - 1}): {len(out)} of {len(held)} outside"
                     + (f" ({', '.join(out)})" if out else "") + f"; largest |z| / limit {max(h['max_abs_z_over_limit'] for h in held):.3g}")
    return lines


def _localization_lines(pair: dict, indent: str) -> list[str]:
    """`probes: <where the probes first part>`, and the probe problems unless the pair lists them already."""
    loc = pair.get("localization")  # verdicts written before probes have none
    if not loc:
        return []
    listed = set(pair.get("problems", []))  # rule (b) made them pair problems, listed under the pair already
    lines = [] if f"probes: {loc['line']}" in listed else [f"{indent}probes: {loc['line']}"]
    return lines + [f"{indent}  probe problem: {q}" for q in loc["problems"] if f"probes: {q}" not in listed]


def ran_on(verdict: dict) -> str:
    """Where the case actually ran, e.g. "cuda/nccl (NVIDIA H100 80GB HBM3)" or "cpu/gloo"."""
    device, backend = verdict.get("device", "unknown"), verdict.get("backend", "unknown")
    kind = {"nccl": "cuda", "gloo": "cpu"}.get(backend, "unknown")
    return f"{kind}/{backend}" + (f" ({device})" if kind == "cuda" and device not in ("cuda", "unknown") else "")


def device_counts(run_dir, cases=None) -> tuple[list[str], str]:
    """One line per judged case in run_dir (or those named) naming where it ran, and the count per device."""
    lines, counts = [], {}
    for path in sorted(Path(run_dir).glob("*/verdict.json")):
        if cases is not None and path.parent.name not in cases:
            continue
        try:
            v = read_json(path)
        except RecordError:
            continue
        where = ran_on(v)
        counts[where] = counts.get(where, 0) + 1
        lines.append(f"{v.get('case')} {'PASS' if v.get('passed') else 'FAIL'} on {where}")
    return lines, ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def _row_where(e: dict) -> str:
    """A table row's step, parameter, or (statistical mode) window of steps."""
    return f"steps {e['window'][0]}-{e['window'][1]}" if "window" in e else str(e.get("step", e.get("param")))


def divergence_table(verdict: dict) -> str:
    """The failing rows only: for each failing pair/baseline and metric, its first failing entry."""
    rows = []
    for p in verdict["pairs"]:
        if p["passed"]:
            continue
        for name, m in p["metrics"].items():
            e = _first(m, verdict["mode"])
            if not m["passed"] and e is not None and verdict["outcome"] == "match":
                rows.append((f"{p['reference']} vs {p['other']}", name, e))
    for b in verdict["baselines"]:
        if b["passed"]:
            continue
        for name, m in b["metrics"].items():
            e = _first(m, {"exact": "bitwise"}.get(b["how"], b["how"]))
            if e is not None and not m["passed"]:
                rows.append((f"baseline {b['setup']} vs run", name, e))
    header = ("pair", "metric", "step|param", "reference", "other", "abs", "rel", "ulps")
    table = [header] + [(who, name, _row_where(e), repr(e["value_ref"]), repr(e["value_other"]), repr(e["abs"]),
                         repr(e["rel"]), ulps_text(e) if "ulps" in e else f"z {e['z']:.3g} (limit {e['limit']:.3g})")
                        for who, name, e in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table) if rows else ""
    # Where the probes first part says which module to look at; a problem line that says it already is enough.
    said = " ".join(verdict["problems"])
    where = [f"{p['reference']} vs {p['other']} probes: {p['localization']['line']}" for p in verdict["pairs"]
             if not p["passed"] and p.get("localization") and p["localization"]["line"] not in said]
    text = "\n".join(filter(None, [text, *where]))
    # The problem lines carry what a table row cannot: crashed runs, missing steps, NaN, a negative
    # control that did not diverge, a missing baseline and the command that creates it.
    return "\n".join(filter(None, [text, *("- " + line for line in verdict["problems"])]))
