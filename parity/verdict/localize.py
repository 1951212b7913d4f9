"""Where two runs' probes first part: the first probe, in causal order, that differs.

A probe (probes.csv, see parity.core.records) is one number per (step, phase, name, stat): per probed
step the forward modules in execution order, then the gradients in backward order, then the
weight updates. Probes are logical (the whole global batch, the full parameter), so any two
layouts of one model record the same entries, and the first entry that differs is where their
numerics part: everything before it still agrees.

The causal order is the reference file's order. "Differs" follows the case's mode: bitwise, any
bit of the float64 (parity.verdict.numbers.bitwise_equal); tolerance, |other - ref| > atol + rtol * |ref| with
the tolerance of the entry's phase ([expect.tolerance] forward/backward/update). NaN and Inf
never agree. An entry one run has and the other lacks, a duplicated entry, or different probed
steps, is a problem line, never a silent skip.

The result (verdict.json `pairs[i].localization`, parity.verdict.model.Localization):

    {probed, mode, first: null | E, before: [E] (up to BEFORE entries just before `first`, all agreeing),
     agree_until: str, steps: [probed steps], problems: [str], line: str,
     first_not_bitwise: null | E (the first entry not bitwise equal, whatever the mode)}
    E = {step, phase, name, stat, value_ref, value_other, abs, rel, ulps, ulp_unit}

This module reads numbers only; it never imports torch.
"""

from __future__ import annotations

import math

import numpy as np

from parity.core.records import PROBE_PHASES, read_setup_run, setup_dir
from parity.case.schema import Case, Tolerance, default_tolerances
from parity.verdict.model import BASIS, Localization
from parity.verdict.numbers import bitwise_equal, entry, span

BEFORE = 3  # how many agreeing entries a localization shows before the first that differs
TOP = 10  # how many entries `parity locate` lists by size at the first diverging step


def probe_tolerances(case: Case) -> dict[str, Tolerance]:
    """Each probe phase's tolerance: the case's, else the default for its dtype (a hand-built Expect may lack them)."""
    defaults = default_tolerances(case.setups)[1]
    return {phase: case.expect.tolerance.get(phase, defaults[phase]) for phase in PROBE_PHASES}


def _key(row: dict) -> tuple:
    """What aligns two runs' probes: a probes.csv row's, or an entry E's, (step, phase, name, stat)."""
    return row["step"], row["phase"], row["name"], row["stat"]


def _index(rows: list[dict], label: str, problems: list[str]) -> dict:
    """(step, phase, name, stat) -> value, in the file's order; a duplicated entry is a problem."""
    out: dict = {}
    twice = []
    for r in rows:
        k = _key(r)
        if k in out:
            twice.append(_where(k))
        else:
            out[k] = float(r["value"])
    if twice:
        problems.append(f"{label} has probes twice: {span(twice)}")
    return out


def _where(key: tuple) -> str:
    step, phase, name, stat = key
    return f"step {step}, {phase}, {name}" + ("" if stat == "sumsq" else f" ({stat})")


def agrees(e: dict, mode: str, tolerances: dict[str, Tolerance]) -> bool:
    """Whether an aligned entry agrees under the mode: the one rule localize, the matrix and the lists share."""
    ref, other = e["value_ref"], e["value_other"]
    if mode == "bitwise":
        return bitwise_equal(ref, other)  # NaN and Inf never equal
    return math.isfinite(ref) and math.isfinite(other) and tolerances[e["phase"]].allows(other, ref)


def align(ref_rows: list[dict], other_rows: list[dict], labels=("reference", "other"),
          unit: str | None = None) -> tuple[list[dict], list[str]]:
    """The entries both runs recorded, in the reference's causal order, and the problems of the rest.

    Each entry is E (see the module docstring) plus `exact` (bitwise equal).
    """
    problems: list[str] = []
    ref = _index(ref_rows, labels[0], problems)
    other = _index(other_rows, labels[1], problems)
    ref_steps, other_steps = _steps(ref), _steps(other)
    if ref_steps != other_steps:
        problems.append(f"{labels[1]} probed steps {span(other_steps)}, {labels[0]} probed steps {span(ref_steps)}")
    if missing := [_where(k) for k in ref if k not in other and k[0] in other_steps]:
        problems.append(f"{labels[1]} lacks probes {span(missing)} that {labels[0]} has")
    if extra := [_where(k) for k in other if k not in ref and k[0] in ref_steps]:
        problems.append(f"{labels[1]} has probes {span(extra)} that {labels[0]} lacks")
    bad = [f"{_where(k)} in {label}" for label, values in zip(labels, (ref, other))
           for k, v in values.items() if not math.isfinite(v)]
    if bad:
        problems.append(f"non-finite probes: {span(bad)}")
    entries = []
    for k in ref:
        if k in other:
            e = entry("step", k[0], ref[k], other[k], unit)
            entries.append({**e, "phase": k[1], "name": k[2], "stat": k[3],
                            "exact": bitwise_equal(ref[k], other[k])})
    return entries, problems


def _steps(values: dict) -> list[int]:
    return list(dict.fromkeys(k[0] for k in values))


def _shown(e: dict) -> dict:
    """E in causal-key-first order, without the alignment's own flag."""
    head = {k: e[k] for k in ("step", "phase", "name", "stat")}
    return {**head, **{k: v for k, v in e.items() if k not in head and k != "exact"}}


def rel_text(rel: float) -> str:
    return f"{rel:.1e}" if math.isfinite(rel) and rel != 0.0 else str(rel)


def localize(ref_probes: list[dict] | None, other_probes: list[dict] | None, mode: str,
             tolerances: dict[str, Tolerance], labels=("reference", "other"), unit: str | None = None) -> Localization:
    """The localization of a pair (see the module docstring); probes None: a run recorded none."""
    lacking = [name for name, rows in zip(labels, (ref_probes, other_probes)) if rows is None]
    if lacking:
        return Localization(probed=False, mode=mode, first=None, before=[], agree_until=None, steps=[], problems=[],
                            line=f"no probes recorded by {' and '.join(lacking)}")
    entries, problems = align(ref_probes, other_probes, labels, unit)
    if not entries and not problems:
        problems.append("no probes to compare")
    agree = [agrees(e, mode, tolerances) for e in entries]
    i = next((j for j, ok in enumerate(agree) if not ok), None)
    differing = next((_shown(e) for e in entries if not e["exact"]), None)
    same = "equal" if mode == "bitwise" else "within tolerance"
    first = None if i is None else _shown(entries[i])
    before = [] if i is None else [_shown(e) for e in entries[max(0, i - BEFORE):i]]
    agree_until = None if i is None else f"everything before it {same}"
    if first is not None:
        line = f"first {BASIS[mode]}: {_where(_key(first))} (rel {rel_text(first['rel'])}); {agree_until}"
    elif entries:
        line = "probes agree (bitwise)" if mode == "bitwise" else "probes agree (within tolerance)"
    else:
        line = "no probes compared"
    # Problems (missing, duplicated, non-finite entries) are listed beside the line, never folded into it.
    steps = list(dict.fromkeys(r["step"] for r in ref_probes))
    return Localization(probed=True, mode=mode, first=first, before=before, agree_until=agree_until, steps=steps,
                        problems=problems, line=line, first_not_bitwise=differing)


def matrix(ref_probes: list[dict], other_probes: list[dict], mode: str = "bitwise",
           tolerances: dict[str, Tolerance] | None = None) -> dict:
    """The |relative difference| of every entry, for the heatmap.

    rows: (phase, name, stat) in causal order within a step (the reference's, then any only the
    other has); columns: the probed steps. rel: |other - ref| / |ref| (inf where ref is 0 and they
    differ), NaN where not comparable (missing in either run, or non-finite); exact: bitwise equal
    (rel 0.0 there, but a -0.0 against 0.0 also has rel 0.0 and is not exact); agree: agrees under
    the mode (False where not comparable).
    """
    entries, _ = align(ref_probes, other_probes)
    keys = list(dict.fromkeys([(r["phase"], r["name"], r["stat"]) for r in ref_probes]
                              + [(r["phase"], r["name"], r["stat"]) for r in other_probes]))
    steps = list(dict.fromkeys([r["step"] for r in ref_probes] + [r["step"] for r in other_probes]))
    row, col = {k: i for i, k in enumerate(keys)}, {s: j for j, s in enumerate(steps)}
    rel = np.full((len(keys), len(steps)), np.nan)
    exact = np.zeros(rel.shape, dtype=bool)
    agree = np.zeros(rel.shape, dtype=bool)
    for e in entries:
        i, j = row[(e["phase"], e["name"], e["stat"])], col[e["step"]]
        if math.isfinite(e["value_ref"]) and math.isfinite(e["value_other"]):
            rel[i, j] = e["rel"]
            exact[i, j] = e["exact"]
            agree[i, j] = agrees(e, mode, tolerances or {})
    return {"rows": keys, "steps": steps, "rel": rel, "exact": exact, "agree": agree}


def largest(ref_probes: list[dict], other_probes: list[dict], step: int, n: int = TOP, mode: str = "bitwise",
            tolerances: dict[str, Tolerance] | None = None) -> list[dict]:
    """The n entries of one step with the largest relative difference (non-finite ones first): E and
    `agrees` (under the mode)."""
    entries, _ = align(ref_probes, other_probes)
    at = [e for e in entries if e["step"] == step and not e["exact"]]
    at.sort(key=lambda e: math.inf if math.isnan(e["rel"]) else e["rel"], reverse=True)
    return [{**_shown(e), "agrees": agrees(e, mode, tolerances or {})} for e in at[:n]]


def _table(rows: list[tuple], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _row(e: dict, mark: str = "") -> tuple:
    rel = "0 (exact)" if e["abs"] == 0.0 and e["rel"] == 0.0 and bitwise_equal(e["value_ref"], e["value_other"]) \
        else rel_text(e["rel"])
    return (str(e["step"]), e["phase"], e["name"] + ("" if e["stat"] == "sumsq" else f" ({e['stat']})"),
            repr(e["value_ref"]), repr(e["value_other"]), rel, mark)


def locate_text(case, run_dir, top: int = TOP) -> tuple[str, bool]:
    """`parity locate`: per pair of the case's run under run_dir, where the probes first part, the entries
    just before it, and the `top` largest relative differences at that step. Returns (text, whether any
    pair's probes diverged). Records that cannot be read raise RecordError (bad input)."""
    runs = {s.name: read_setup_run(setup_dir(run_dir, case.name, s.name)) for s in case.setups}
    ref = case.reference.name
    lines, diverged = [], False
    for s in case.setups[1:]:
        a, b = runs[ref], runs[s.name]
        loc = localize(a["probes"], b["probes"], case.expect.mode, probe_tolerances(case), (ref, s.name))
        steps = ", ".join(map(str, loc.steps)) or "none"
        lines.append(f"{case.name}: {ref} vs {s.name} (mode {case.expect.mode}; probed steps {steps})")
        for name, run in ((ref, a), (s.name, b)):
            if run["info"].get("status") != "ok":  # a failed run records no probes: say why there are none
                lines.append(f"  {name}: run status is {run['info'].get('status')!r}")
        lines.append(f"  {loc.line}")
        first = loc.first
        if first is not None:
            diverged = True
            header = ("step", "phase", "name", "reference", "other", "rel", "")
            lines += _table([header] + [_row(e) for e in loc.before] + [_row(first, "<- first")], "    ")
            tol = probe_tolerances(case)
            worst = largest(a["probes"], b["probes"], first["step"], top, case.expect.mode, tol)
            lines.append(f"  largest relative differences at step {first['step']}:")
            beyond = "beyond tolerance" if case.expect.mode == "tolerance" else ""
            lines += _table([header] + [_row(e, "" if e["agrees"] else beyond) for e in worst], "    ")
        lines += [f"  - {q}" for q in loc.problems]
    return "\n".join(lines), diverged
