"""The verdict's schema: what `<out>/<case>/verdict.json` holds, as typed records.

`Verdict.to_json()` is the file's content, key for key in the order below (records.write_json writes it);
`Verdict.from_json()` reads it back, and `read_verdict()` reads the file. Readers take the records' attributes.

Records (dataclasses, fields in their JSON order):

- Verdict: one case. `passed == not problems`; `repeat` is the reference against its repeat run
  (always bitwise), `statistical` the ensemble's summary (mode "statistical" only).
- Pair: the reference against one other setup. `passed` applies the outcome on top of the metrics'
  own `passed` (for "diverge" it is true when some metric does not match); `diverged` is set whenever
  something diverged, whatever the outcome. A repeat pair also has `cause`.
- MetricResult: one metric of a pair or baseline check. `passed` means "matches under the mode";
  `not_recorded` marks a weights lane a command setup gave no weights for; `statistical` is the
  ensemble test that decides a step metric in mode "statistical".
- Localization: where the two runs' probes first part (parity.verdict.localize).
- Headline: the one first divergence a reader sees, in causal order across the lanes
  (parity.verdict.headline), and the first entry that is not bitwise equal.
- BaselineCheck: one setup's run against its stored baseline (parity.verdict.baselines). `triage` says why a
  comparison failed (a Triage; null where the baseline matched, was missing or was not compared).
- Triage: a failed baseline comparison's kind (parity.verdict.triage). "drift": environment drift, not bitwise
  but every compared step of every metric within the case's tolerance; `metric`/`step`/`entry` are the first
  entry that is not bitwise. "changed": anything else, the numerics beyond tolerance (or, compared within
  tolerance or against the ensemble on another platform, failing at all); `metric`/`step`/`entry` are the
  first failing one (an Entry, or a BandFailure in mode "statistical"), all three null where the run could not
  be judged step for step (`line` names the problem). `max_rel` is the largest relative
  difference over every compared step and metric; `where` (changed only) says what can localise the change,
  which a baseline (loss and grad norm) cannot; `line` is the triage in words.
- StatisticalTest: one setup's windows against the ensemble's band (parity.verdict.ensemble).

Leaves whose keys vary by kind stay dicts, typed below: Entry (a step, parameter or probe entry),
Divergence, BandFailure, Effect, StatisticalSummary.

A field set to ABSENT is left out of the JSON (where None is written as null).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, TypedDict

from parity.core.records import RecordError, read_json


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()  # a key this record's JSON leaves out; None is a key written as null
STEP_METRICS = ("loss", "grad_norm")  # the metrics recorded per step; a pair's third is its final weights
# What an entry that fails under each mode is called, wherever a verdict is shown ("first beyond tolerance").
BASIS = {"tolerance": "beyond tolerance", "bitwise": "not bitwise", "statistical": "outside the band"}


class Difference(TypedDict, total=False):
    """Two compared values, their differences and the ulps between them, counted in `ulp_unit` ("f32" or "f64")."""
    value_ref: float
    value_other: float
    abs: float
    rel: float
    ulps: int | None
    ulp_unit: str


class Entry(Difference, total=False):
    """One compared value: `step` or `param` (a weights entry whose sketch failed also has `sketch`, 0-based),
    a probe's `phase`, `name`, `stat`, and the Difference."""
    step: int
    param: str
    phase: str
    name: str
    stat: str
    sketch: int


class BandFailure(TypedDict):
    """Where a setup first leaves the ensemble's band: the window's last step and its steps, the ensemble's
    mean (value_ref) and the setup's value, their differences, z and the limit it passed."""
    step: int
    window: list[int]
    value_ref: float
    value_other: float
    abs: float
    rel: float
    z: float
    limit: float


class Divergence(Difference, total=False):
    """A pair's first divergence: `metric`, `step` (None for weights), `param` (None for step metrics), then
    the Entry's (or, in mode "statistical", the BandFailure's) remaining keys."""
    metric: str
    step: int | None
    param: str | None
    sketch: int
    window: list[int]
    z: float
    limit: float


class Effect(TypedDict):
    """A negative control's observed divergence against the size its case declares."""
    expected: dict
    ratio: float
    rel: float
    problems: list[str]


class StatisticalSummary(TypedDict, total=False):
    """The ensemble (parity.verdict.ensemble.evaluate) and the reference's own test, {metric: StatisticalTest}."""
    members: list[str]
    k: int
    perturb: str
    window: int
    alpha: float
    metrics: list[str]
    tests: int
    limit: float
    window_ends: list[int]
    bands: dict
    windows_at_floor: dict[str, int]
    held_out: list[dict]
    reference: dict[str, StatisticalTest | None] | None


def to_json(value):
    """A record, or a dict or list holding records, as plain JSON values (ABSENT fields left out)."""
    if is_dataclass(value):
        return {_key(f): to_json(getattr(value, f.name)) for f in fields(value) if getattr(value, f.name) is not ABSENT}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def _key(f) -> str:
    return f.metadata.get("json", f.name)


class Record:
    """A verdict record: to_json gives its JSON value, from_json reads it back (a record with records in its
    fields converts them in its own from_json)."""

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, data: dict):
        return cls(**_plain(cls, data))


def _fields_by_key(cls) -> dict[str, str]:
    return {_key(f): f.name for f in fields(cls)}


def _plain(cls, data: dict, **nested) -> dict:
    """Constructor arguments of `cls` from its JSON keys; `nested` converts some values, and a key the JSON
    lacks is ABSENT."""
    out = {}
    for key, name in _fields_by_key(cls).items():
        value = data.get(key, ABSENT)
        out[name] = nested[name](value) if name in nested and value is not ABSENT and value is not None else value
    return out


@dataclass(eq=True)
class StatisticalTest(Record):
    passed: bool
    values: list[float]
    z: list[float]
    max_abs_z: float
    failing_windows: int
    first_failure: BandFailure | None


@dataclass(eq=True)
class MetricResult(Record):
    n: int
    exact_equal_steps: int
    bitwise: bool
    within_tolerance: bool
    max_abs: float
    max_rel: float
    failing_steps: int
    first_not_bitwise: Entry | None
    first_beyond_tolerance: Entry | None
    passed: bool
    problems: list[str]
    not_recorded: str = ABSENT
    statistical: StatisticalTest | None = ABSENT

    def first_failing(self, mode: str) -> Entry | BandFailure | None:
        """The first entry that fails under `mode`: the first divergence (bitwise), the first tolerance failure
        (tolerance), or the ensemble test's first window outside the band (statistical)."""
        if mode == "statistical":
            return self.statistical.first_failure if self.statistical else None
        return self.first_not_bitwise if mode == "bitwise" else self.first_beyond_tolerance

    @classmethod
    def from_json(cls, data: dict) -> MetricResult:
        return cls(**_plain(cls, data, statistical=StatisticalTest.from_json))


@dataclass(eq=True)
class Localization(Record):
    probed: bool
    mode: str
    first: Entry | None
    before: list[Entry]
    agree_until: str | None
    steps: list[int]
    problems: list[str]
    line: str
    first_not_bitwise: Entry | None = ABSENT  # the first probe not bitwise equal, whatever the mode

    @classmethod
    def from_json(cls, data: dict) -> Localization:
        return cls(**_plain(cls, data))


@dataclass(eq=True)
class Headline(Record):
    text: str  # what every surface prints for the pair
    lane: str | None  # "probes", "loss", "grad_norm" or "weights": where the first failing entry is; None: none
    basis: str | None  # why it fails: "beyond tolerance", "not bitwise" or "outside the band"
    entry: Entry | BandFailure | None
    not_bitwise_lane: str | None  # the lane of the first entry not bitwise equal, whether or not it fails
    not_bitwise: Entry | None


def _metrics(data: dict) -> dict[str, MetricResult]:
    return {name: MetricResult.from_json(m) for name, m in data.items()}


@dataclass(eq=True)
class Pair(Record):
    reference: str
    other: str
    passed: bool
    problems: list[str]
    diverged: Divergence | None
    effect: Effect | None
    metrics: dict[str, MetricResult]
    modes: dict[str, str]
    notes: list[str]
    localization: Localization = ABSENT
    headline: Headline = ABSENT  # ABSENT in a verdict written before headlines
    cause: str | None = ABSENT

    @classmethod
    def from_json(cls, data: dict) -> Pair:
        return cls(**_plain(cls, data, metrics=_metrics, localization=Localization.from_json,
                            headline=Headline.from_json))


@dataclass(eq=True)
class Triage(Record):
    kind: str  # "drift" or "changed"
    metric: str | None
    step: int | None
    entry: Entry | BandFailure | None
    max_rel: float
    where: str
    line: str


@dataclass(eq=True)
class BaselineCheck(Record):
    setup: str
    path: str | None
    platform: str
    status: str  # match, mismatch, missing, updated or error
    basis: str = field(metadata={"json": "how"})  # compared "exact", within "tolerance", or "statistical"
    passed: bool
    metrics: dict[str, MetricResult]
    message: str
    obtained: str | None
    triage: Triage | None = None  # ABSENT in a verdict written before triage was recorded

    @classmethod
    def from_json(cls, data: dict) -> BaselineCheck:
        return cls(**_plain(cls, data, metrics=_metrics, triage=Triage.from_json))


def _summary(data: dict) -> StatisticalSummary:
    own = data.get("reference")
    if own is None:
        return dict(data)
    return {**data, "reference": {m: t and StatisticalTest.from_json(t) for m, t in own.items()}}


@dataclass(eq=True)
class Verdict(Record):
    case: str
    passed: bool
    mode: str
    outcome: str
    reference: str
    platform: str
    device: str
    backend: str
    tolerance: dict[str, dict]  # {metric or probe phase: {rtol, atol, source}}
    repeat: Pair | None
    statistical: StatisticalSummary | None
    pairs: list[Pair]
    baselines: list[BaselineCheck]
    problems: list[str]
    notes: list[str]

    @classmethod
    def from_json(cls, data: dict) -> Verdict:
        return cls(**_plain(cls, data, repeat=Pair.from_json, statistical=_summary,
                            pairs=lambda ps: [Pair.from_json(p) for p in ps],
                            baselines=lambda bs: [BaselineCheck.from_json(b) for b in bs]))


def read_verdict(path) -> Verdict:
    """`<out>/<case>/verdict.json` as a Verdict; a RecordError when the file is not a JSON object, or holds a value
    where a record belongs that is not one (a key it lacks is ABSENT, as from_json reads it)."""
    data = read_json(path)
    try:
        return Verdict.from_json(data)
    except (AttributeError, TypeError) as e:  # a list, a number or a string where a record's object belongs
        raise RecordError(f"{path}: not a verdict: {e}") from None
