"""The report's model of a run directory: its case runs, each setup's records and what the case's verdict.json says.

A run directory holds `<case>/<setup>/{metrics.csv,run.json}` and `<case>/verdict.json`. This module reads them
(never writes) and draws nothing. Every field the report reads of a verdict is read here, through VerdictView and
PairView, with its default for a verdict that lacks it (an older one, or none at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from parity.case.schema import MEMBER_SUFFIX
from parity.core import records
from parity.core.paths import name_problem
from parity.verdict.formatting import ran_on, statistical_tests

PLOTTED = ("loss", "grad_norm")
LABEL = {"loss": "loss", "grad_norm": "grad norm"}


def number(value) -> float | None:
    """A JSON number, or the strings 'nan'/'inf'/'-inf' that records.write_json writes for them; None otherwise."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class PairView:
    """One pair of a verdict: `other` judged against `reference`."""

    doc: dict

    @property
    def reference(self):
        return self.doc.get("reference")

    @property
    def other(self):
        return self.doc.get("other")

    @property
    def passed(self) -> bool:
        return bool(self.doc.get("passed"))

    @property
    def problems(self) -> list[str]:
        return self.doc.get("problems") or []

    @property
    def diverged(self) -> dict | None:
        """The pair's first divergence entry (step or param, metric, both values); None when it has none."""
        return self.doc.get("diverged") or None

    @property
    def localization(self) -> dict:
        """Where the pair's probes first part; {} for a verdict written before probes."""
        return self.doc.get("localization") or {}

    @property
    def probe_problems(self) -> list[str]:
        """What kept the pair's probes from being compared in full."""
        return self.localization.get("problems") or []

    def metric(self, name: str) -> dict:
        """The pair's summary of one metric (max_abs, max_rel, exact_equal_steps, n, ...); {} when absent."""
        return (self.doc.get("metrics") or {}).get(name) or {}

    def mode_of(self, metric, default):
        """The mode the metric was judged in, where it differs by metric; `default` otherwise."""
        return (self.doc.get("modes") or {}).get(metric, default)


class VerdictView:
    """What the report reads of a case's verdict.json (None: the case has no verdict)."""

    def __init__(self, doc: dict | None):
        self.doc = doc or {}

    def __bool__(self) -> bool:
        return bool(self.doc)

    @property
    def passed(self) -> bool | None:
        return self.doc.get("passed")

    def get(self, key: str, default="?"):
        """A top-level field as written (mode, outcome, reference, platform), `default` when absent."""
        return self.doc.get(key, default)

    @property
    def problems(self) -> list[str]:
        return self.doc.get("problems") or []

    @cached_property
    def pairs(self) -> list[PairView]:
        return [PairView(p) for p in self.doc.get("pairs") or []]

    def pair(self, other: str) -> PairView:
        """The pair judging `other`; an empty one when there is none."""
        return next((p for p in self.pairs if p.other == other), PairView({}))

    @property
    def baselines(self) -> list[dict]:
        """The baseline checks: setup, platform, status, message, path."""
        return self.doc.get("baselines") or []

    @property
    def statistical(self) -> dict | None:
        """Statistical mode's summary of the ensemble and its band; None in other modes."""
        return self.doc.get("statistical") or None

    def statistical_tests(self) -> dict[str, dict]:
        return statistical_tests(self.doc)

    def ran_on(self) -> str:
        return ran_on(self.doc)

    def tolerance(self, name: str) -> tuple[float, float] | None:
        """(rtol, atol) of a metric or probe phase; None when the verdict has not both."""
        t = (self.doc.get("tolerance") or {}).get(name) or {}
        rtol, atol = number(t.get("rtol")), number(t.get("atol"))
        return None if rtol is None or atol is None else (rtol, atol)

    def words(self) -> str:
        """'PASS (tolerance, expect match)', 'FAIL (...)' or 'no verdict'."""
        if not self:
            return "no verdict"
        return f"{'PASS' if self.passed else 'FAIL'} ({self.get('mode')}, expect {self.get('outcome')})"

    def max_rel(self, metric: str) -> float | None:
        """The largest relative difference of a metric over the pairs; NaN, the worst, wins."""
        values = [number(p.metric(metric).get("max_rel")) for p in self.pairs]
        values = [x for x in values if x is not None]
        # NaN compares false with everything; a NaN difference is the worst one, so it wins.
        return next((x for x in values if math.isnan(x)), max(values, default=None))


def baseline_origin(entry: dict) -> str:
    """Where a baseline check's stored baseline came from and how it fared: "(cpu-gloo, ok)"."""
    return f"({entry.get('platform') or '?'}, {entry.get('status', '?')})"


# ----------------------------------------------------------------------------- the records


@dataclass
class SetupRun:
    name: str
    run: dict  # run.json, {} when the setup left none
    metrics: dict[str, np.ndarray]  # the columns of metrics.csv, {} when it left none
    probes: list[dict] | None = None  # rows of probes.csv, None when it left none

    @property
    def steps(self) -> int:
        return len(self.metrics.get("step", ()))


@dataclass
class CaseRun:
    name: str
    dir: Path
    verdict: dict | None  # verdict.json as read; read it through `judged`
    setups: list[SetupRun]  # the reference first
    baselines: dict[str, tuple[dict, dict[str, np.ndarray]]] = field(default_factory=dict)  # setup -> (entry, columns)

    @cached_property
    def judged(self) -> VerdictView:
        return VerdictView(self.verdict)

    @property
    def platform(self) -> str:
        if self.judged.get("platform", None):
            return str(self.judged.get("platform"))
        return next((str(s.run["platform"]) for s in self.setups if s.run.get("platform")), "?")


def _is_case_dir(d: Path) -> bool:
    # A folder whose name no case could have is not one of ours (and its name goes into Markdown).
    return (name_problem(d.name) is None and d.is_dir()
            and ((d / "verdict.json").is_file() or any(d.glob("*/metrics.csv"))))


def find_case_runs(run_dir) -> list[str]:
    """The names of the case runs in a run directory (folders with a verdict.json or a setup's metrics.csv), sorted."""
    run_dir = Path(run_dir)
    return sorted(d.name for d in run_dir.iterdir() if _is_case_dir(d)) if run_dir.is_dir() else []


def _read_json_or_empty(path: Path) -> dict:
    try:
        return records.read_json(path) if path.is_file() else {}
    except records.RecordError:
        return {}


def _baseline_path(entry: dict, run_dir: Path) -> Path | None:
    # The verdict stores the path as the comparer saw it: absolute, or relative to where it ran
    # (the repository root), or possibly to the run directory. Try each; a missing file is fine.
    raw = entry.get("path")
    if not raw:
        return None
    p = Path(raw)
    for cand in (p, run_dir / p, run_dir.parent / p):
        if cand.is_file():
            return cand
    return None


def _setup_names(case_dir: Path, judged: VerdictView) -> list[str]:
    """The case's setup folders: the verdict's reference and pairs in its order, then any it does not name."""
    # Statistical mode's ensemble members are drawn from the verdict's band, not as setups of their own.
    names = sorted(d.name for d in case_dir.iterdir() if d.is_dir() and MEMBER_SUFFIX not in d.name
                   and name_problem(d.name) is None  # a setup's name is checked where its folder is made
                   and ((d / "metrics.csv").is_file() or (d / "run.json").is_file()))
    if not judged:
        return names
    order = [judged.get("reference", None)] + [p.other for p in judged.pairs]
    order = [n for n in dict.fromkeys(order) if n in names]
    return order + [n for n in names if n not in order]


def _read_baselines(judged: VerdictView, run_dir: Path) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """Per setup, its baseline check and the baseline's columns, where the file is still there and reads."""
    baselines = {}
    for entry in judged.baselines:
        path = _baseline_path(entry, run_dir)
        if path is None or not entry.get("setup"):
            continue
        try:
            baselines[entry["setup"]] = (entry, records.read_columns(path)[1])
        except records.RecordError:
            pass
    return baselines


def load_case_run(run_dir, case: str) -> CaseRun:
    """A case run's verdict, setups (the reference first) and baselines, as far as they can be read."""
    run_dir = Path(run_dir)
    case_dir = run_dir / case
    verdict = _read_json_or_empty(case_dir / "verdict.json") or None
    judged = VerdictView(verdict)
    setups = []
    for name in _setup_names(case_dir, judged):
        run = records.read_setup_run(case_dir / name, lenient=True)
        setups.append(SetupRun(name, run["info"], run["metrics"] or {}, run["probes"]))
    return CaseRun(case, case_dir, verdict, setups, _read_baselines(judged, run_dir))


def load_case_runs(run_dir) -> list[CaseRun]:
    """Every case run in the run directory, by name."""
    return [load_case_run(run_dir, name) for name in find_case_runs(run_dir)]


# ----------------------------------------------------------------------------- series


def metric_series(columns: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a metric as recorded, row by row; empty when the columns lack it."""
    if metric not in columns:
        return np.empty(0, np.int64), np.empty(0)
    return columns["step"], columns[metric]


def by_step(columns: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps in increasing order, each once, with its last recorded value): what a dict keyed by step holds."""
    steps, values = metric_series(columns, metric)
    last = last_rows(steps)
    return steps[last], values[last]


def last_rows(steps: np.ndarray) -> np.ndarray:
    """The index of each step's last row, in increasing step order."""
    return len(steps) - 1 - np.unique(steps[::-1], return_index=True)[1]
