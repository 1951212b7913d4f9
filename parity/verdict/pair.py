"""The pair verdict: the reference setup against one other, lane by lane, then the rules that decide it.

Lanes, each a MetricResult under its own mode (`Pair.modes`):

- metrics: loss and grad norm, step by step, under the case's mode; a metric read from rounded log text
  (metrics.csv `<metric>_rounding`, see parity.trainers.readers) is compared within tolerance, each
  step's allowance widened by the two runs' rounding at that step, and a note says so.
- statistical override (mode "statistical", parity.verdict.ensemble): the step lanes are computed within
  tolerance, for information, and the ensemble test decides a step metric's `passed`.
- weights: final weights under the case's mode; not compared in mode "statistical" (runs that drift
  apart have no band for their final weights); `not_recorded` (passing, "not compared") where a command
  setup gave none (a built-in run's missing weights.csv still fails).
- probes: where the two runs' probes first part (parity.verdict.localize), under the case's mode.

Outcome rules: a problem (a run that did not finish, NaN/Inf, missing or extra entries) fails the pair
whatever the case expects. A "match" pair fails on every metric that does not match; a negative control
("diverge") fails when every metric matches, when its first divergence is not the metric and step its
case declares (`[expect] first_divergence`), or when its size is not the declared effect. Probes change a
pair's verdict only where a rule says so: (a) a negative control with `[expect] localized = {step, phase,
name}` fails unless the probes first part exactly there; (b) in a "match" pair whose metrics all pass
and whose runs both recorded probes, a probe divergence or problem is a pair problem "probes: ...".
"""

from __future__ import annotations

import math
from dataclasses import replace

from parity.case.schema import Case
from parity.verdict.formatting import band_text, entry_text
from parity.verdict.headline import headline
from parity.verdict.localize import localize, probe_tolerances
from parity.verdict.numbers import produced_unit
from parity.verdict.model import STEP_METRICS, Divergence, Effect, Localization, MetricResult, Pair
from parity.verdict.series import compare_series, compare_weights, not_compared, not_recorded, rounding


def compare_pair(ref_name: str, ref_run: dict, other_name: str, other_run: dict, case: Case,
                 statistical: dict | None = None) -> Pair:
    """The reference against one other setup. In statistical mode `statistical` is parity.verdict.ensemble.evaluate's
    result: the step lanes are computed within tolerance, for information, and the ensemble test decides."""
    mode = case.expect.mode
    labels = (ref_name, other_name)
    problems = ref_run["problems"] + other_run["problems"]
    metrics, modes, notes = {}, {"weights": mode}, []
    for metric in STEP_METRICS:
        metrics[metric], modes[metric], lane_notes, lane_problems = _step_lane(metric, ref_run, other_run, case,
                                                                               labels, statistical)
        notes += lane_notes
        problems += lane_problems
    metrics["weights"], lane_problems = _weights_lane(ref_run, other_run, case, labels)
    problems += lane_problems
    healthy = not problems  # both runs finished and every record was comparable
    if healthy:
        problems += _outcome_problems(metrics, modes, case)
    diverged = _diverged(metrics, modes)
    effect = None
    if not problems and case.expect.outcome == "diverge" and case.expect.first_divergence and diverged:
        effect, control_problems = _control_problems(diverged, case.expect.first_divergence)
        problems += control_problems
    localization = localize(ref_run["probes"], other_run["probes"], _lane_mode(case), probe_tolerances(case), labels,
                            produced_unit(case.setups))
    if healthy and mode != "statistical":  # probes part at the first rounding difference, which this mode expects
        problems += _probe_problems(localization, case, metrics_passed=not problems)
    told = headline(case, metrics, modes, localization if localization.probed else None,
                    localization.first_not_bitwise or None, problems)
    return Pair(reference=ref_name, other=other_name, passed=not problems, problems=problems, diverged=diverged,
                effect=effect, metrics=metrics, modes=modes, notes=notes, localization=localization, headline=told)


def _lane_mode(case: Case) -> str:
    """How the step and probe lanes compare: the case's mode, within tolerance in mode "statistical"."""
    return "tolerance" if case.expect.mode == "statistical" else case.expect.mode


def _step_lane(metric: str, ref_run: dict, other_run: dict, case: Case, labels,
               statistical: dict | None) -> tuple[MetricResult, str, list[str], list[str]]:
    """One step metric of the pair: (its result, the mode it was judged in, notes, pair problems)."""
    lane = _lane_mode(case)
    a, b = ref_run["metrics"], other_run["metrics"]
    if a is None or b is None:
        return not_compared("metrics.csv unreadable"), lane, [], []
    notes = []
    slack = _rounding_slack(a, b, metric)
    if slack is not None:
        # Values read from rounded log text carry no bits to compare: within tolerance plus each step's rounding.
        lane = "tolerance"
        notes.append(f"{metric}: recorded from rounded log text, so compared within tolerance with each step's "
                     f"atol widened by its rounding (at most {max(slack.values()):.3g}), not {case.expect.mode}")
    result = compare_series(a["step"], a[metric], b["step"], b[metric], case.expect.tolerance[metric], lane, labels,
                            slack, produced_unit(case.setups))
    problems = [f"{metric}: {p}" for p in result.problems]
    if case.expect.mode == "statistical":  # the lanes inform; whether the setup stays in the ensemble's band decides
        test = (statistical or {}).get("tests", {}).get(labels[1], {}).get(metric)
        result, lane = replace(result, passed=bool(test and test.passed), statistical=test), case.expect.mode
        if test is None:
            problems.append(f"{metric}: not tested: the ensemble has no band (see the case's problems)")
    return result, lane, notes, problems


def _rounding_slack(a: dict, b: dict, metric: str) -> dict[int, float] | None:
    """Per step, the two runs' rounding of `metric` added up; None when neither was read from rounded text."""
    ra, rb = rounding(a, metric), rounding(b, metric)
    if not (ra.any() or rb.any()):  # NaN counts as rounding here, and then fails every bound it widens
        return None
    ra, rb = dict(zip(a["step"].tolist(), ra.tolist())), dict(zip(b["step"].tolist(), rb.tolist()))
    return {s: ra.get(s, 0.0) + rb.get(s, 0.0) for s in ra.keys() | rb.keys()}


def _weights_lane(ref_run: dict, other_run: dict, case: Case, labels) -> tuple[MetricResult, list[str]]:
    """The final weights of the pair: (the result, pair problems)."""
    mode = case.expect.mode
    unrecorded = [name for name, run in zip(labels, (ref_run, other_run))
                  if run["info"].get("status") == "ok" and run["info"].get("weights_recorded") is False]
    if mode == "statistical":
        return not_recorded("statistical mode judges loss and grad norm per window; the final weights of runs that "
                            "drift apart have no band"), []
    if unrecorded:
        return not_recorded(f"{', '.join(unrecorded)} recorded no final weights (its command setup names no "
                            "`weights`)"), []
    if ref_run["weights"] is None or other_run["weights"] is None:
        return not_compared("weights.csv unreadable"), []
    result = compare_weights(ref_run["weights"], other_run["weights"], case.expect.tolerance["weights"], mode, labels,
                             produced_unit(case.setups))
    return result, [f"weights: {p}" for p in result.problems]


def _outcome_problems(metrics: dict[str, MetricResult], modes: dict[str, str], case: Case) -> list[str]:
    """A healthy pair's problems under the outcome: each metric that does not match ("match"), or none that
    differs ("diverge")."""
    differing = [name for name, m in metrics.items() if not m.passed]
    if case.expect.outcome == "match":
        return [_mismatch(name, metrics[name], modes[name]) for name in differing]
    if not differing:
        return [f"expected a divergence (negative control), but every metric matches ({case.expect.mode})"]
    return []


def _mismatch(metric: str, m: MetricResult, mode: str) -> str:
    unit = "params" if metric == "weights" else "steps"
    if mode == "statistical":
        t = m.statistical
        return (f"{metric}: {t.failing_windows} of {len(t.z)} windows outside the ensemble's band; first at "
                f"{band_text(t.first_failure)}")
    if mode == "bitwise":
        differ = "have another sha256" if metric == "weights" else "differ bitwise"
        e, text = m.first_not_bitwise, f"{m.n - m.exact_equal_steps} of {m.n} {unit} {differ}"
    else:
        e, text = m.first_beyond_tolerance, f"{m.failing_steps} of {m.n} {unit} outside tolerance"
    return f"{metric}: {text}; first at {entry_text(e)}"


def _diverged(metrics: dict[str, MetricResult], modes: dict[str, str]) -> Divergence | None:
    """Earliest failing step across loss and grad_norm (loss first on a tie); else weights: the metric lanes'
    first divergence, which a control's `[expect] first_divergence` names. What a reader sees first is the
    pair's headline (parity.verdict.headline), which also weighs the probes."""
    firsts = [(i, name, metrics[name].first_failing(modes[name])) for i, name in enumerate(STEP_METRICS)]
    found = [(e["step"], i, name, e) for i, name, e in firsts if e is not None]
    if found:
        _, _, name, e = min(found, key=lambda t: t[:2])
        return {"metric": name, "step": e["step"], "param": None, **{k: v for k, v in e.items() if k != "step"}}
    e = metrics["weights"].first_failing(modes["weights"])
    if e is not None:
        return {"metric": "weights", "step": None, **e}
    return None


def _control_problems(diverged: Divergence, want: dict) -> tuple[Effect | None, list[str]]:
    """A control must be caught for the right reason: the planted bug's metric, at its step, by the size of
    effect it plants. Returns (the observed effect, None where the place is wrong; problems)."""
    found = (diverged["metric"], diverged.get("step"))
    if found != (want["metric"], want["step"]):
        return None, [f"expected the first divergence on {want['metric']} at step {want['step']}, "
                      f"found it on {found[0]} at step {found[1]}"]
    effect = _effect(diverged, want)
    return effect, effect["problems"]


def _effect(diverged: Divergence, want: dict) -> Effect:
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


def _probe_problems(loc: Localization, case: Case, metrics_passed: bool) -> list[str]:
    """The two rules by which probes change a pair's verdict (see the module docstring)."""
    want = case.expect.localized
    if case.expect.outcome == "diverge" and want:
        first = loc.first
        found = f"{_probe_where(first)} (rel {first['rel']:.3g})" if first else f"no divergence ({loc.line})"
        if first is None or (first["step"], first["phase"], first["name"]) != (want["step"], want["phase"], want["name"]):
            return [f"expected the divergence localized at {_probe_where(want)}; found {found}"]
        return []
    if case.expect.outcome == "match" and metrics_passed and loc.probed:
        return [f"probes: {p}" for p in loc.problems] + ([f"probes: {loc.line}"] if loc.first else [])
    return []


def _probe_where(e: dict) -> str:
    return f"step {e['step']}, {e['phase']}, {e['name']}"
