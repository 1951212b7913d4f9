"""The regression report: which cases' verdicts or numbers changed between two runs; written as `regression.md`
in the newer run directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from parity.core import records
from parity.core.rundir import claim
from parity.report import markdown
from parity.report.model import find_case_runs, last_rows, load_case_run
from parity.report.tables import number_text

# Columns compared by the regression report; step_time_s is wall time and differs every run.
NUMERIC = ("loss", "grad_norm", "lr", "tokens")


def _worst(values: np.ndarray) -> float:
    """The largest value, NaN counting as larger than any (the first of equals, as max() picks)."""
    return float(values[np.argmax(np.where(np.isnan(values), np.inf, values))])


def _compare_setup(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> list[str]:
    """Markdown lines describing how one setup's metrics changed; [] when bitwise identical."""
    lines = []
    new_steps, old_steps = new.get("step", np.empty(0, np.int64)), old.get("step", np.empty(0, np.int64))
    new_last, old_last = last_rows(new_steps), last_rows(old_steps)
    if not np.array_equal(new_steps[new_last], old_steps[old_last]):
        lines.append(f"steps differ: {len(old_last)} before, {len(new_last)} now")
    common, i, j = np.intersect1d(new_steps[new_last], old_steps[old_last], assume_unique=True, return_indices=True)
    for metric in NUMERIC:
        if metric not in new or metric not in old:
            continue
        now, before = new[metric][new_last][i], old[metric][old_last][j]
        # Bitwise identity of the doubles: 0.0 and -0.0 differ, and NaN equals NaN of the same payload.
        a, b = now.astype(np.float64), before.astype(np.float64)
        changed = np.flatnonzero(a.view(np.int64) != b.view(np.int64))
        if not changed.size:
            continue
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            abs_d = np.abs(a - b)[changed]
            rel_d = np.where(b[changed] != 0, abs_d / np.abs(b[changed]), np.inf)
        k = changed[0]
        lines.append(f"{metric}: {len(changed)}/{len(common)} steps changed, max abs {number_text(_worst(abs_d))}, "
                     f"max rel {number_text(_worst(rel_d))}, first at step {common[k]} "
                     f"({before[k].item()!r} → {now[k].item()!r})")
    return lines


def _weights_changes(new_dir: Path, old_dir: Path) -> list[str]:
    try:
        new = {r["param"]: r["sha256"] for r in records.read_weights(new_dir / "weights.csv")}
        old = {r["param"]: r["sha256"] for r in records.read_weights(old_dir / "weights.csv")}
    except records.RecordError:
        return []  # one side has no weights file: nothing to compare
    changed = sorted(p for p in set(new) | set(old) if new.get(p) != old.get(p))
    return [f"weights: {len(changed)} parameters changed, first {changed[0]}"] if changed else []


def _case_changes(new_dir: Path, old_dir: Path, name: str) -> list[str]:
    """Markdown lines saying how one case changed: its verdict, its setups, their metrics and weights."""
    new, old = load_case_run(new_dir, name), load_case_run(old_dir, name)
    lines = []
    if old.passed != new.passed:
        lines.append(markdown.text(f"verdict: {old.words()} → {new.words()}"))
    old_setups = {s.name: s for s in old.setups}
    new_setups = {s.name: s for s in new.setups}
    for setup in sorted(set(old_setups) | set(new_setups)):
        if setup not in new_setups or setup not in old_setups:
            lines.append(f"setup `{setup}` only in the {'old' if setup in old_setups else 'new'} run")
            continue
        diffs = _compare_setup(new_setups[setup].metrics, old_setups[setup].metrics)
        diffs += _weights_changes(new_dir / name / setup, old_dir / name / setup)
        lines += [f"`{setup}` {markdown.text(d)}" for d in diffs]
    return lines


def regression_report(new_dir, old_dir) -> tuple[str, list[str]]:
    """Cases whose verdict or numbers changed from `old_dir` to `new_dir`; writes `<new_dir>/regression.md`."""
    new_dir, old_dir = Path(new_dir), Path(old_dir)
    new_cases, old_cases = set(find_case_runs(new_dir)), set(find_case_runs(old_dir))
    changed, sections, unchanged = [], [], 0
    for name in sorted(new_cases & old_cases):
        lines = _case_changes(new_dir, old_dir, name)
        if lines:
            changed.append(name)
            sections += [f"### {name}", ""] + [f"- {ln}" for ln in lines] + [""]
        else:
            unchanged += 1
    only_new, only_old = sorted(new_cases - old_cases), sorted(old_cases - new_cases)
    changed = sorted(changed + only_new + only_old)
    md = ["# Parity regression report", "", f"New run: {markdown.code(new_dir)}  ", f"Old run: {markdown.code(old_dir)}", "",
          f"{len(changed)} changed · {unchanged} unchanged (bitwise-identical metrics, same verdict)", ""]
    if only_new:
        md += ["Only in the new run: " + ", ".join(f"`{n}`" for n in only_new), ""]
    if only_old:
        md += ["Only in the old run: " + ", ".join(f"`{n}`" for n in only_old), ""]
    md += sections
    text = "\n".join(md)
    records.atomic_write_text(claim(new_dir, "regression.md"), text)
    return text, changed
