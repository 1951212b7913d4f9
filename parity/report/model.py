"""The report's model of a run directory: its case runs, each setup's records and what the case's verdict.json says.

A run directory holds `<case>/<setup>/{metrics.csv,run.json}` and `<case>/verdict.json`. This module reads them
(never writes) and draws nothing. A case run holds its verdict as a typed Verdict (parity.verdict.model), None
without one, and answers the questions the report asks of it (words, max_rel, tolerance, pair). A verdict written
by an older parity lacks the fields added since (device and backend, statistical, a pair's modes and localization,
the probe phases' tolerances): from_json leaves them ABSENT, and the report reads them as not there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.case.schema import MEMBER_SUFFIX
from parity.core import records
from parity.core.paths import name_problem
from parity.verdict.model import BaselineCheck, Pair, Verdict, read_verdict

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


def baseline_origin(check: BaselineCheck) -> str:
    """Where a baseline check's stored baseline came from and how it fared: "(cpu-gloo, ok)"."""
    return f"({check.platform or '?'}, {check.status})"


def read_case_verdict(path: Path) -> Verdict | None:
    """A case's verdict.json as a Verdict; None where the case has none, or one that does not read as a verdict
    (not JSON, not an object, an empty object): the report shows such a case without a verdict."""
    if not path.is_file():
        return None
    try:
        verdict = read_verdict(path)
    except records.RecordError:
        return None
    return verdict if verdict.to_json() else None


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
    verdict: Verdict | None  # None: the case has no verdict.json, or one that does not read as a verdict
    setups: list[SetupRun]  # the reference first
    baselines: dict[str, tuple[BaselineCheck, dict[str, np.ndarray]]] = field(default_factory=dict)  # setup -> (check, columns)

    @property
    def passed(self) -> bool | None:
        """Whether the verdict passed; None without a verdict."""
        return None if self.verdict is None else self.verdict.passed

    @property
    def mode(self) -> str | None:
        """The verdict's mode (bitwise, tolerance or statistical); None without a verdict."""
        return None if self.verdict is None else self.verdict.mode

    @property
    def pairs(self) -> list[Pair]:
        """The verdict's pairs; none without a verdict."""
        return self.verdict.pairs if self.verdict is not None else []

    @property
    def baseline_checks(self) -> list[BaselineCheck]:
        """The verdict's baseline checks; none without a verdict."""
        return self.verdict.baselines if self.verdict is not None else []

    @property
    def platform(self) -> str:
        if self.verdict is not None and self.verdict.platform:
            return str(self.verdict.platform)
        return next((str(s.run["platform"]) for s in self.setups if s.run.get("platform")), "?")

    def words(self) -> str:
        """'PASS (tolerance, expect match)', 'FAIL (...)' or 'no verdict'."""
        if self.verdict is None:
            return "no verdict"
        return f"{'PASS' if self.verdict.passed else 'FAIL'} ({self.verdict.mode}, expect {self.verdict.outcome})"

    def pair(self, other: str) -> Pair | None:
        """The verdict's pair judging `other`; None when there is none."""
        return next((p for p in self.pairs if p.other == other), None)

    def tolerance(self, name: str) -> tuple[float, float] | None:
        """(rtol, atol) of a metric or probe phase; None when the verdict has not both (a verdict written before
        probes has no probe phases)."""
        t = self.verdict.tolerance.get(name) if self.verdict is not None else None
        rtol, atol = (number(t.get("rtol")), number(t.get("atol"))) if t else (None, None)
        return None if rtol is None or atol is None else (rtol, atol)

    def max_rel(self, metric: str) -> float | None:
        """The largest relative difference of a metric over the pairs; NaN, the worst, wins."""
        values = [number(p.metrics[metric].max_rel) for p in self.pairs]
        values = [x for x in values if x is not None]
        # NaN compares false with everything; a NaN difference is the worst one, so it wins.
        return next((x for x in values if math.isnan(x)), max(values, default=None))


def _is_case_dir(d: Path) -> bool:
    # A folder whose name no case could have is not one of ours (and its name goes into Markdown).
    return (name_problem(d.name) is None and d.is_dir()
            and ((d / "verdict.json").is_file() or any(d.glob("*/metrics.csv"))))


def find_case_runs(run_dir) -> list[str]:
    """The names of the case runs in a run directory (folders with a verdict.json or a setup's metrics.csv), sorted."""
    run_dir = Path(run_dir)
    return sorted(d.name for d in run_dir.iterdir() if _is_case_dir(d)) if run_dir.is_dir() else []


def _baseline_path(check: BaselineCheck, run_dir: Path) -> Path | None:
    # The verdict stores the path as the comparer saw it: absolute, or relative to where it ran
    # (the repository root), or possibly to the run directory. Try each; a missing file is fine.
    raw = check.path
    if not raw:
        return None
    p = Path(raw)
    for cand in (p, run_dir / p, run_dir.parent / p):
        if cand.is_file():
            return cand
    return None


def _setup_names(case_dir: Path, verdict: Verdict | None) -> list[str]:
    """The case's setup folders: the verdict's reference and pairs in its order, then any it does not name."""
    # Statistical mode's ensemble members are drawn from the verdict's band, not as setups of their own.
    names = sorted(d.name for d in case_dir.iterdir() if d.is_dir() and MEMBER_SUFFIX not in d.name
                   and name_problem(d.name) is None  # a setup's name is checked where its folder is made
                   and ((d / "metrics.csv").is_file() or (d / "run.json").is_file()))
    if verdict is None:
        return names
    order = [verdict.reference] + [p.other for p in verdict.pairs]
    order = [n for n in dict.fromkeys(order) if n in names]
    return order + [n for n in names if n not in order]


def _read_baselines(verdict: Verdict | None, run_dir: Path) -> dict[str, tuple[BaselineCheck, dict[str, np.ndarray]]]:
    """Per setup, its baseline check and the baseline's columns, where the file is still there and reads."""
    baselines = {}
    for check in verdict.baselines if verdict is not None else []:
        path = _baseline_path(check, run_dir)
        if path is None or not check.setup:
            continue
        try:
            baselines[check.setup] = (check, records.read_columns(path)[1])
        except records.RecordError:
            pass
    return baselines


def load_case_run(run_dir, case: str) -> CaseRun:
    """A case run's verdict, setups (the reference first) and baselines, as far as they can be read."""
    run_dir = Path(run_dir)
    case_dir = run_dir / case
    verdict = read_case_verdict(case_dir / "verdict.json")
    setups = []
    for name in _setup_names(case_dir, verdict):
        run = records.read_setup_run(case_dir / name, lenient=True)
        setups.append(SetupRun(name, run["info"], run["metrics"] or {}, run["probes"]))
    return CaseRun(case, case_dir, verdict, setups, _read_baselines(verdict, run_dir))


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
