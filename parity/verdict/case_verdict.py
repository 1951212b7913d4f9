"""The case verdict: every setup of a case against its reference, the repeat check, the statistical mode's
ensemble, and the baseline checks, in one Verdict written to `<out>/<case>/verdict.json`.

A setup that did not finish, NaN or Inf anywhere, and missing, extra, duplicated or out-of-order steps are
problems: a pair with a problem fails whatever the case expects. A negative control (outcome "diverge")
must show a numerical divergence between two healthy runs; a crash, a missing file or a NaN is not the
divergence it is looking for. `problems` lists every reason the case fails, so `passed == not problems`.

The repeat check comes first: when the run directory holds `<reference>.repeat` (the reference run a
second time in the same launch), the two must be bitwise equal, or the case fails with "nondeterministic
reference": then no bitwise verdict between setups means anything.

This module reads files and numbers only; it never imports torch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from parity.core.paths import inside
from parity.core.records import read_setup_run, write_json
from parity.case.schema import REPEAT_SUFFIX, Case
from parity.verdict import ensemble
from parity.verdict.formatting import band_text, baseline_text
from parity.verdict.model import BaselineCheck, Pair, Verdict
from parity.verdict.pair import compare_pair


def load_run(directory: Path, name: str) -> dict:
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


def load_runs(case: Case, run_dir: str | Path) -> dict[str, dict]:
    """Every setup's records (see load_run), ensemble members' too, by name: read once, then judged between
    setups and against baselines."""
    return {s.name: load_run(Path(run_dir) / case.name / s.name, s.name) for s in (*case.setups, *case.ensemble)}


def compare_case(case: Case, run_dir: str | Path, baselines: list[BaselineCheck] | None = None,
                 runs: dict[str, dict] | None = None) -> Verdict:
    """The verdict of one case from the runs under run_dir/<case>/ (and baseline checks, if given);
    `runs` is load_runs(case, run_dir) where the caller has read them already."""
    runs = runs if runs is not None else load_runs(case, run_dir)
    ref = case.reference.name
    repeat = _repeat(case, Path(run_dir) / case.name, runs[ref])
    statistical = _statistical(case, runs)
    pairs = [compare_pair(ref, runs[ref], s.name, runs[s.name], case, statistical) for s in case.setups[1:]]
    problems = [repeat.cause] if repeat and repeat.cause else []
    problems += statistical["problems"] if statistical else []
    problems += [f"{p.reference} vs {p.other}: {line}" for p in pairs for line in p.problems]
    info = runs[ref]["info"] or {}
    verdict = Verdict(case=case.name, passed=not problems, mode=case.expect.mode, outcome=case.expect.outcome,
                      reference=ref, platform=info.get("platform", "unknown"), device=info.get("device", "unknown"),
                      backend=info.get("backend", "unknown"), tolerance=_tolerances(case), repeat=repeat,
                      statistical=statistical and statistical["summary"], pairs=pairs, baselines=[],
                      problems=problems, notes=_case_file_notes(case, runs))
    return with_baselines(verdict, baselines or [])


def _repeat(case: Case, base: Path, ref_run: dict) -> Pair | None:
    """The reference against its repeat run, bitwise, with the cause line of a failure; None without a repeat."""
    name = case.reference.name + REPEAT_SUFFIX
    if not (base / name).is_dir():
        return None
    bitwise = replace(case, expect=replace(case.expect, mode="bitwise", outcome="match", first_divergence=None,
                                           localized=None))
    again = load_run(base / name, name)
    repeat = compare_pair(case.reference.name, ref_run, name, again, bitwise)
    repeat.cause = _repeat_cause(repeat, ref_run["problems"] + again["problems"])
    return repeat


def _repeat_cause(pair: Pair, run_problems: list[str]) -> str | None:
    """The cause line of a failed repeat check (None if it passed)."""
    if pair.passed:
        return None
    d = pair.diverged
    if run_problems or d is None or any(m.problems for m in pair.metrics.values()):
        return "repeat check: " + "; ".join(pair.problems)
    where = f"step {d['step']}" if d["step"] is not None else f"param {d['param']}"
    return (f"nondeterministic reference: {pair.reference} run twice in one launch differs first at {where} "
            f"on {d['metric']} ({d['value_ref']!r} vs {d['value_other']!r}); until that is fixed no bitwise "
            "verdict between setups means anything")


def _tolerances(case: Case) -> dict:
    return {m: {"rtol": t.rtol, "atol": t.atol, "source": case.expect.tolerance_source.get(m, "case")}
            for m, t in case.expect.tolerance.items()}


def unjudged_verdict(case: Case, problem: str) -> Verdict:
    """A failing verdict for a case that could not be judged (its records or a baseline could not be read,
    the disk refused a write): `problem` says why, in one line."""
    return Verdict(case=case.name, passed=False, mode=case.expect.mode, outcome=case.expect.outcome,
                   reference=case.reference.name, platform="unknown", device="unknown", backend="unknown",
                   tolerance=_tolerances(case), repeat=None, statistical=None, pairs=[], baselines=[],
                   problems=[problem], notes=[])


def _statistical(case: Case, runs: dict) -> dict | None:
    """Statistical mode's ensemble and tests (parity.verdict.ensemble.evaluate), with the reference's own test in the
    summary: a reference outside its own ensemble's band means the band cannot be trusted (a problem)."""
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
        if not t.passed and not ref["problems"]:
            problems.append(f"the reference {case.reference.name} leaves its own ensemble's band on {metric} at "
                            f"{band_text(t.first_failure)}: the members do not vary as the reference's own "
                            "rounding does, so the band cannot judge")
    return {**result, "problems": problems}


def with_baselines(verdict: Verdict, baselines: list[BaselineCheck]) -> Verdict:
    """The verdict with the baseline checks added: each failing one is a problem of the case, its triage first."""
    problems = verdict.problems + [f"baseline {b.setup}: {baseline_text(b)}" for b in baselines if not b.passed]
    return replace(verdict, passed=not problems, baselines=list(baselines), problems=problems)


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


def write_verdict(run_dir: str | Path, verdict: Verdict) -> Path:
    """verdict.json: `verdict.to_json()`, written by records.write_json."""
    path = verdict_path(run_dir, verdict.case)
    write_json(path, verdict.to_json())
    return path
