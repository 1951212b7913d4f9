"""A run directory as pandas DataFrames, for a notebook: `parity.load(RUN)`.

    run = parity.load("reports/runs/latest")
    one = run.metrics[run.metrics.case == "replicate_vs_hsdp"]
    loss = one.pivot(index="step", columns="setup", values="loss")
    (loss["hsdp_8x1"] - loss["replicate"]).plot()

Values are the float64s the run files hold, read exactly (records.read_setup_run); nothing is
rounded. Reading never writes: a case or setup whose files cannot be read has no rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from parity.core.errors import InputError
from parity.report.model import CaseRun, load_case_runs, number
from parity.verdict.formatting import headline_text
from parity.verdict.model import ABSENT

METRICS_KEYS = ("case", "setup")
PROBE_COLUMNS = ("case", "setup", "step", "phase", "name", "stat", "value")
PAIR_COLUMNS = ("case", "reference", "other", "passed", "case_passed", "mode", "outcome", "headline", "headline_lane",
                "diverged_metric",
                "diverged_step", "diverged_param", "diverged_rel", "localized_step", "localized_phase",
                "localized_name", "localized_rel")


@dataclass(frozen=True)
class Run:
    """One run directory: `metrics` (one row per case, setup and recorded step: the columns of metrics.csv),
    `probes` (long form: case, setup, step, phase, name, stat, value) and `pairs` (one row per judged pair:
    whether it passed, its headline (the first divergence in causal order, and its lane), where its metric lanes
    first failed (diverged_*) and where its probes first parted (localized_*))."""

    metrics: pd.DataFrame
    probes: pd.DataFrame
    pairs: pd.DataFrame


def load(run_dir: str | Path) -> Run:
    """The run directory's metrics, probes and verdicts as DataFrames."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a run directory (no such folder)")
    cases = load_case_runs(run_dir)
    return Run(_metrics(cases), _probes(cases), _pairs(cases))


def _metrics(cases: list[CaseRun]) -> pd.DataFrame:
    frames = [pd.DataFrame({"case": c.name, "setup": s.name, **s.metrics}) for c in cases for s in c.setups
              if s.metrics]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*METRICS_KEYS, "step"])


def _probes(cases: list[CaseRun]) -> pd.DataFrame:
    rows = [{"case": c.name, "setup": s.name, **row} for c in cases for s in c.setups for row in s.probes or ()]
    return pd.DataFrame(rows, columns=list(PROBE_COLUMNS))


def _pairs(cases: list[CaseRun]) -> pd.DataFrame:
    rows = []
    for c in cases:
        v = c.verdict
        for p in v.pairs if v is not None else ():
            diverged = p.diverged or {}
            first = p.localization.first if p.localization is not ABSENT and p.localization.first else {}
            rows.append({"case": c.name, "reference": p.reference, "other": p.other, "passed": p.passed,
                         "case_passed": v.passed, "mode": v.mode, "outcome": v.outcome,
                         "headline": headline_text(p) or None, "headline_lane": p.headline.lane if p.headline else None,
                         "diverged_metric": diverged.get("metric"), "diverged_step": diverged.get("step"),
                         "diverged_param": diverged.get("param"), "diverged_rel": number(diverged.get("rel")),
                         "localized_step": first.get("step"), "localized_phase": first.get("phase"),
                         "localized_name": first.get("name"), "localized_rel": number(first.get("rel"))})
    # Nullable integers: a pair without a divergence or a localisation has no step.
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS)).astype({"diverged_step": "Int64", "localized_step": "Int64"})
