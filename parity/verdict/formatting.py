"""What a person reads of a verdict: the summary (format_verdict), the failing rows (divergence_table), an
entry's or band window's one line, where a case ran, and a statistical verdict's ensemble lines.

Each takes a Verdict (or a part of one); device_counts reads the verdict.json files of a run directory.
"""

from __future__ import annotations

from pathlib import Path

from parity.core.records import RecordError
from parity.verdict.model import ABSENT, BASIS, STEP_METRICS, BaselineCheck, MetricResult, Pair, StatisticalSummary, \
    StatisticalTest, Verdict, read_verdict
from parity.verdict.headline import size_text
from parity.verdict.numbers import short, ulps_text


def entry_text(e: dict) -> str:
    """Where an entry is and both values: "step 4: 1.25 vs 1.2500001 (rel 8e-08, abs 1e-07, 1 f32 ulp)"."""
    return f"{_where(e)}: {values_text(e)}"


def values_text(e: dict) -> str:
    """An entry's two values and their differences: "1.25 vs 1.2500001 (rel 8e-08, abs 1e-07, 1 f32 ulp)"."""
    stat = f"{e['stat']} " if "stat" in e else ""  # a probe's statistic: its value is not the tensor's
    return f"{stat}{e['value_ref']!r} vs {e['value_other']!r} (rel {short(e['rel'])}, abs {e['abs']:.3g}, " \
           f"{ulps_text(e)})"


def _where(e: dict) -> str:
    if e.get("param") is not None:  # a pair's `diverged` at a step carries "param": None
        return f"param {e['param']}" + (f" sketch{e['sketch']}" if "sketch" in e else "")
    return f"step {e['step']}"


def band_text(e: dict) -> str:
    """Where a window leaves the band: "steps 26-50: 3.2154 vs ensemble mean 3.1002 (rel 0.0372, z 41.3, limit 7.02)"."""
    return (f"steps {e['window'][0]}-{e['window'][1]}: {e['value_other']!r} vs ensemble mean {e['value_ref']!r} "
            f"(rel {e['rel']:.3g}, z {e['z']:.3g}, limit {e['limit']:.3g})")


def _three_digits(x) -> str:
    """A float to 3 significant digits; anything else as it is."""
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _metric_line(name: str, m: MetricResult) -> str:
    if m.not_recorded:
        return f"{name:<10} not compared: {m.not_recorded}"
    unit = "params" if name == "weights" else "steps"
    line = f"{name:<10} exact {m.exact_equal_steps}/{m.n} {unit}, max rel {_three_digits(m.max_rel)}, " \
           f"max abs {_three_digits(m.max_abs)}, outside tolerance {m.failing_steps}"
    # Problems are listed once, under the pair.
    e, beyond = m.first_not_bitwise, m.first_beyond_tolerance
    line += f", first {BASIS['bitwise']} {_where(e)} ({size_text(e)})" if e else ", bitwise equal"
    line += f", first {BASIS['tolerance']} {_where(beyond)} ({size_text(beyond)})" if beyond else ""
    t = m.statistical
    if t:
        line += (f"; ensemble: max |z| {_three_digits(t.max_abs_z)}, {t.failing_windows} of {len(t.z)} windows "
                 "outside the band")
    return line


def format_verdict(verdict: Verdict) -> str:
    """A short human summary: per pair and metric both lanes, the tolerances used, the baselines."""
    v = verdict
    lines = [f"{v.case}: {'PASS' if v.passed else 'FAIL'} on {ran_on(v)} (mode {v.mode}, "
             f"outcome {v.outcome}, reference {v.reference}, platform {v.platform})"]
    lines.append("  tolerance: " + "; ".join(f"{m} rtol={t['rtol']!r} atol={t['atol']!r} ({t['source']})"
                                            for m, t in v.tolerance.items()))
    lines += [f"  note: {n}" for n in v.notes]
    lines += ensemble_lines(v.statistical)
    r = v.repeat
    if r is not None:
        lines.append(f"  repeat check ({r.reference} twice, bitwise): " + ("PASS" if r.passed else "FAIL: " + r.cause))
        if not r.passed:
            lines += _localization_lines(r, "    ")  # which module is nondeterministic, where probes say
    for p in v.pairs:
        lines += _pair_lines(p)
    for b in v.baselines:
        lines.append(f"  baseline {b.setup} [{b.platform}, {b.basis}]: {b.status}{'' if b.passed else ' FAIL'}: "
                     f"{baseline_text(b)}")
        if b.triage and b.triage.where:
            lines.append(f"    localisation: {b.triage.where}")
    return "\n".join(lines)


def baseline_text(b: BaselineCheck) -> str:
    """A baseline check in one line: its triage where it failed a comparison (or was rewritten after one), then
    its message: "numerics changed: loss beyond tolerance at step 3 (rel 1.0e-03); differs from ..."."""
    return f"{b.triage.line}; {b.message}" if b.triage else b.message  # ABSENT in a verdict from before triage


def headline_text(p: Pair) -> str:
    """The pair's one first divergence (parity.verdict.headline); a verdict written before headlines had none."""
    if p.headline:
        return p.headline.text
    d = p.diverged
    return "" if d is None else f"first diverged: {d['metric']} at " + (
        f"step {d['step']}" if d["step"] is not None else f"param {d['param']}")


def _pair_lines(p: Pair) -> list[str]:
    told = headline_text(p)
    lines = [f"  {p.reference} vs {p.other}: {'PASS' if p.passed else 'FAIL'}" + (f"; {told}" if told else "")]
    lines += [f"    {_metric_line(name, m)}" for name, m in p.metrics.items()]
    lines += _localization_lines(p, "    ")
    lines += [f"    note: {line}" for line in p.notes]
    return lines + [f"    - {line}" for line in p.problems]


def statistical_tests(verdict: Verdict) -> dict[str, dict[str, StatisticalTest | None]]:
    """A statistical verdict's tests by setup, {setup: {metric: test or None}}: the reference's own first, then
    each pair's other setup."""
    out = {verdict.reference: verdict.statistical.get("reference") or {}}  # None where the ensemble tested nothing
    for p in verdict.pairs:
        out[p.other] = {m: _test_of(p.metrics.get(m)) for m in STEP_METRICS}
    return out


def _test_of(m: MetricResult | None) -> StatisticalTest | None:
    return m.statistical if m is not None and m.statistical is not ABSENT else None


def ensemble_lines(st: StatisticalSummary | None) -> list[str]:
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
            f"{m} max |z| {_three_digits(t.max_abs_z)}" + ("" if t.passed else " (OUTSIDE)")
            for m, t in ref.items()))
    held = st.get("held_out") or []
    if held:
        out = [h["member"] for h in held if not h["passed"]]
        lines.append(f"  held-out members (each against the other {st['k'] - 1}): {len(out)} of {len(held)} outside"
                     + (f" ({', '.join(out)})" if out else "") + f"; largest |z| / limit {max(h['max_abs_z_over_limit'] for h in held):.3g}")
    return lines


def _localization_lines(pair: Pair, indent: str) -> list[str]:
    """`probes: <where the probes first part>`, and the probe problems unless the pair lists them already."""
    loc = pair.localization  # verdicts written before probes have none
    if not loc:
        return []
    listed = set(pair.problems)  # rule (b) made them pair problems, listed under the pair already
    lines = [] if f"probes: {loc.line}" in listed else [f"{indent}probes: {loc.line}"]
    return lines + [f"{indent}  probe problem: {q}" for q in loc.problems if f"probes: {q}" not in listed]


def ran_on(verdict: Verdict) -> str:
    """Where the case actually ran, e.g. "cuda/nccl (NVIDIA H100 80GB HBM3)" or "cpu/gloo"; "unknown" where the
    verdict does not say (one written before it recorded the device)."""
    device = "unknown" if verdict.device is ABSENT else verdict.device
    backend = "unknown" if verdict.backend is ABSENT else verdict.backend
    kind = {"nccl": "cuda", "gloo": "cpu"}.get(backend, "unknown")
    return f"{kind}/{backend}" + (f" ({device})" if kind == "cuda" and device not in ("cuda", "unknown") else "")


def device_counts(run_dir, cases=None) -> tuple[list[str], str]:
    """One line per judged case in run_dir (or those named) naming where it ran, and the count per device."""
    lines, counts = [], {}
    for path in sorted(Path(run_dir).glob("*/verdict.json")):
        if cases is not None and path.parent.name not in cases:
            continue
        try:
            v = read_verdict(path)
        except RecordError:
            continue
        where = ran_on(v)
        counts[where] = counts.get(where, 0) + 1
        lines.append(f"{v.case} {'PASS' if v.passed else 'FAIL'} on {where}")
    return lines, ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def _row_where(e: dict) -> str:
    """A table row's step, parameter, or (statistical mode) window of steps."""
    return f"steps {e['window'][0]}-{e['window'][1]}" if "window" in e else str(e.get("step", e.get("param")))


def _failing_rows(verdict: Verdict) -> list[tuple[str, str, dict]]:
    """(who, metric, first failing entry) for each failing pair/baseline and metric."""
    rows = []
    for p in verdict.pairs:
        if p.passed:
            continue
        for name, m in p.metrics.items():
            e = m.first_failing(verdict.mode)
            if not m.passed and e is not None and verdict.outcome == "match":
                rows.append((f"{p.reference} vs {p.other}", name, e))
    for b in verdict.baselines:
        if b.passed:
            continue
        for name, m in b.metrics.items():
            e = m.first_failing({"exact": "bitwise"}.get(b.basis, b.basis))
            if e is not None and not m.passed:
                rows.append((f"baseline {b.setup} vs run", name, e))
    return rows


def divergence_table(verdict: Verdict) -> str:
    """Each failing pair's headline, then the failing rows only: for each failing pair/baseline and metric, its
    first failing entry."""
    told = [f"{p.reference} vs {p.other}: {headline_text(p)}" for p in verdict.pairs if not p.passed
            and headline_text(p)]
    rows = _failing_rows(verdict)
    header = ("pair", "metric", "step|param", "reference", "other", "rel", "abs", "ulps")
    table = [header] + [(who, name, _row_where(e), repr(e["value_ref"]), repr(e["value_other"]), repr(e["rel"]),
                         repr(e["abs"]), ulps_text(e) if "ulps" in e else f"z {e['z']:.3g} (limit {e['limit']:.3g})")
                        for who, name, e in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table) if rows else ""
    # Where the probes first part says which module to look at; a problem line that says it already is enough.
    said = " ".join(verdict.problems)
    where = [f"{p.reference} vs {p.other} probes: {p.localization.line}" for p in verdict.pairs
             if not p.passed and p.localization and p.localization.line not in said
             and not (p.headline and p.headline.lane == "probes")]  # the headline named that entry already
    # A baseline cannot say which module changed; its triage says what can.
    where += [f"baseline {b.setup}: {b.triage.where}" for b in verdict.baselines
              if not b.passed and b.triage and b.triage.where]
    text = "\n".join(filter(None, [*told, text, *where]))
    # The problem lines carry what a table row cannot: crashed runs, missing steps, NaN, a negative
    # control that did not diverge, a missing baseline and the command that creates it.
    return "\n".join(filter(None, [text, *("- " + line for line in verdict.problems)]))
