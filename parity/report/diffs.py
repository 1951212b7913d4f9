"""Panel (c) of a case's figure: |setup - reference| per step on a log axis, with the tolerance, the exact steps
in a band of their own, non-finite differences along the top, and each setup's first step beyond tolerance (crimson)
and first step not bitwise (grey, said to be within tolerance where it is) ringed and named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import blended_transform_factory

from parity.report.canvas import envelope, marked, one_per_column, stride
from parity.report.model import LABEL, CaseRun, SetupRun, by_step
from parity.verdict.headline import where_text
from parity.verdict.model import BASIS

LANE = 10 ** 0.35  # factor between two lanes of the exact band on the log axis
# How each metric's differences are drawn: line style and marker.
METRIC_STYLE = {"loss": ("-", "o"), "grad_norm": ("--", "s")}


# ----------------------------------------------------------------------------- data


@dataclass
class DiffSeries:
    """One setup's differences to the reference in one metric, at the steps both recorded."""

    setup: str
    metric: str
    steps: np.ndarray
    diffs: np.ndarray  # |other - ref|, 0 where bitwise equal, NaN/inf where either is not finite
    magnitude: np.ndarray  # |ref|, for the tolerance at each step
    colour: str

    @property
    def linestyle(self) -> str:
        return METRIC_STYLE[self.metric][0]

    @property
    def marker(self) -> str:
        return METRIC_STYLE[self.metric][1]


def _diffs(ref: SetupRun, other: SetupRun, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common steps, |other - ref|, and |ref| (for the tolerance at each step)."""
    ref_steps, r = by_step(ref.metrics, metric)
    other_steps, o = by_step(other.metrics, metric)
    steps, i, j = np.intersect1d(ref_steps, other_steps, assume_unique=True, return_indices=True)
    r, o = r[i], o[j]
    with np.errstate(invalid="ignore", over="ignore"):
        return steps, np.where(o != r, np.abs(o - r), 0.0), np.abs(r)


def difference_series(case: CaseRun) -> list[DiffSeries]:
    """Per metric (loss, then grad norm), each setup after the reference that shares steps with it."""
    ref, others = case.setups[0], [s for s in case.setups[1:] if s.steps]
    series = []
    for metric in METRIC_STYLE:
        for s in others:
            steps, d, magnitude = _diffs(ref, s, metric)
            if len(steps):
                series.append(DiffSeries(s.name, metric, steps, d, magnitude, f"C{case.setups.index(s) % 10}"))
    return series


# ----------------------------------------------------------------------------- tolerance bands


def tolerance_lines(case: CaseRun, series: list[DiffSeries]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(metric, steps, atol + rtol x |ref|) per metric with a tolerance, at the first setup's steps."""
    # Only a tolerance-mode case has a band to stay inside; in bitwise mode any difference fails.
    if case.mode != "tolerance":
        return []
    lines = {}
    for s in series:
        tolerance = case.tolerance(s.metric)
        if tolerance and s.metric not in lines:
            lines[s.metric] = (s.metric, s.steps, tolerance[1] + tolerance[0] * s.magnitude)
    return list(lines.values())


# ----------------------------------------------------------------------------- drawing


@dataclass
class LogScale:
    """The panel's y range: the data's decades, an exact band of one lane per series below `floor`."""

    floor: float
    top: float
    bottom: float
    any_positive: bool

    def lane(self, j: int) -> float:
        return self.floor / LANE ** (j + 1)

    @property
    def not_finite(self) -> float:
        """Where NaN and inf differences are drawn: along the top."""
        return self.top / LANE


def log_scale(series: list[DiffSeries], tolerances: list) -> LogScale:
    """Decades from the smallest to the largest positive difference or tolerance, headroom above for labels."""
    positive = np.concatenate([s.diffs for s in series] + [t for _, _, t in tolerances])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    lo = float(positive.min()) if positive.size else 1e-12
    hi = float(positive.max()) if positive.size else lo * 1e4
    floor = 10 ** (math.floor(math.log10(lo)) - 1)
    top = 10 ** (math.ceil(math.log10(hi)) + 2)  # headroom for the divergence labels along the top
    return LogScale(floor, top, floor / LANE ** (len(series) + 1), bool(positive.size))


def _draw_axis(ax, scale: LogScale, n_series: int) -> None:
    """The log axis with the shaded exact band beneath `floor`."""
    # Exact (bitwise-equal) steps have no logarithm. They go in a shaded band under `floor`, one
    # lane per series, so "equal" is drawn explicitly rather than silently dropped.
    ax.set_yscale("log")
    ax.set_ylim(scale.bottom, scale.top)
    ax.axhspan(scale.bottom, scale.floor, color="0.9", zorder=0)
    # The label sits where the y tick labels are (blanked in the band), clear of the lane markers.
    trans = blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(-0.012, scale.floor / LANE ** ((n_series + 1) / 2), "exact", transform=trans,
            fontsize=9, va="center", ha="right", color="0.25")
    if not scale.any_positive:
        ax.text(0.5, 0.6, "every compared step is bitwise equal", transform=ax.transAxes,
                ha="center", va="center", fontsize=10, color="darkgreen")
    # Tick labels inside the band would read as real magnitudes; blank them.
    floor = scale.floor
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: "" if y < floor * 0.999 else f"1e{math.log10(y):.0f}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))


def _draw_series(ax, s: DiffSeries, lane_y: float, scale: LogScale, n_steps: int) -> None:
    """One series: its positive differences as a line, exact steps in its lane, non-finite ones along the top."""
    d, steps, with_markers = s.diffs, s.steps, marked(n_steps)
    finite = np.isfinite(d) & (d > 0)
    exact = steps[d == 0]
    bad = steps[~np.isfinite(d)]  # NaN/Inf: drawn at the top
    ax.plot(*envelope(steps[finite], d[finite]), color=s.colour, marker=s.marker if with_markers else "none",
            linestyle=s.linestyle, markersize=5, markevery=stride(n_steps) if with_markers else None, linewidth=1.4,
            label=f"{s.setup} {LABEL[s.metric]}", zorder=4)
    if exact.size:
        # Every exact step gets its mark (thinned to one per pixel column only where they would overlap):
        # "equal here" is the claim being shown.
        exact = one_per_column(exact)
        ax.plot(exact, np.full(len(exact), lane_y), color=s.colour, linestyle="none", zorder=4,
                **(dict(marker=s.marker, markersize=4, markerfacecolor="none") if len(steps) <= 30
                   else dict(marker="|", markersize=4.5)))
    if bad.size:
        bad = one_per_column(bad)
        ax.plot(bad, np.full(len(bad), scale.not_finite), color=s.colour, marker="X", linestyle="none", markersize=7,
                zorder=4, label=f"{s.setup} {LABEL[s.metric]} not finite")


# ----------------------------------------------------------------------------- first entries, ringed


@dataclass
class First:
    """A series' first failing step (`basis` "beyond tolerance", "not bitwise" in mode bitwise, ...) or its first
    step that is only not bitwise (`basis` "not bitwise", failing False), where the panel rings it."""

    setup: str
    metric: str
    step: int
    y: float
    basis: str
    failing: bool


RING = {True: dict(markersize=13, markeredgecolor="crimson", markeredgewidth=1.6),  # fails under the case's mode
        False: dict(markersize=10, markeredgecolor="0.45", markeredgewidth=1.2)}  # not bitwise, within tolerance


def _firsts(case: CaseRun, s: DiffSeries, scale: LogScale) -> list[First]:
    """The series' first failing step, as its pair's verdict says, and before it (or without one) its first step
    that is not bitwise equal; a difference within tolerance is never ringed as a failure."""
    pair = case.pair(s.setup)
    m = pair.metrics.get(s.metric) if pair is not None else None
    if m is None:
        return []
    mode = pair.modes.get(s.metric, case.mode) if pair.modes else case.mode
    failing, differing = m.first_failing(mode), m.first_not_bitwise
    out = []
    if failing and "step" in failing:
        out.append(First(s.setup, s.metric, int(failing["step"]), 0.0, BASIS[mode], True))
    if differing and (not out or differing["step"] < out[0].step):
        out.append(First(s.setup, s.metric, int(differing["step"]), 0.0, BASIS["bitwise"], False))
    for f in out:
        at = np.flatnonzero(s.steps == f.step)
        value = s.diffs[at[0]] if at.size else math.nan
        f.y = float(value) if math.isfinite(value) and value > 0 else scale.not_finite
    return out


def _ring(ax, f: First) -> None:
    ax.plot([f.step], [f.y], marker="o", markerfacecolor="none", linestyle="none", zorder=5, **RING[f.failing])


# ----------------------------------------------------------------------------- annotation


def _annotate_firsts(ax, case: CaseRun, firsts: dict[str, list[First]]) -> None:
    """One label per setup: its first failing step, its first step not bitwise where that is earlier or there is no
    failing one (said to be within tolerance), and where its probes part first when they are what the headline
    names."""
    # In a row along the top where the decade of headroom leaves room, with a leader to the point (over the
    # data they hid the curves); ordered by step so the leaders do not cross.
    ordered = sorted(firsts.items(), key=lambda kv: min(f.step for f in kv[1]))
    for n, (name, found) in enumerate(ordered):
        failing = [f for f in found if f.failing]
        only = [f for f in found if not f.failing]
        lines = [name + ":"]
        if failing:
            f = min(failing, key=lambda f: f.step)
            lines.append(f"first {f.basis}: {LABEL[f.metric]}, step {f.step}")
        if only:
            g = min(only, key=lambda f: f.step)
            lines.append(f"first {g.basis}: {LABEL[g.metric]}, step {g.step}" + ("" if failing else
                                                                                    " (within tolerance)"))
        pair = case.pair(name)
        told = pair.headline if pair is not None else None
        if told and told.lane == "probes":
            lines.append(f"probes: first {told.basis} at {where_text('probes', told.entry)}")
        target = min(failing or only, key=lambda f: f.step)
        colour = "crimson" if failing else "0.3"
        ax.annotate("\n".join(lines), (target.step, target.y), xytext=(0.02 + 0.32 * n, 0.95),
                    textcoords="axes fraction", va="top", fontsize=8, color=colour,
                    bbox=dict(boxstyle="round,pad=0.25", fc="white", ec=colour, lw=0.6, alpha=0.9),
                    arrowprops=dict(arrowstyle="-", color=colour, lw=0.8, shrinkB=7), zorder=6)


def _legend(ax, firsts: dict[str, list[First]]) -> None:
    handles, labels = ax.get_legend_handles_labels()
    for failing in (True, False):
        bases = sorted({f.basis for found in firsts.values() for f in found if f.failing is failing})
        if bases:
            handles.append(Line2D([], [], marker="o", markerfacecolor="none", linestyle="none",
                                  **{**RING[failing], "markersize": 9}))
            labels.append(" / ".join(f"first {b}" for b in bases) + ("" if failing else " (within tolerance)"))
    ax.legend(handles, labels, fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.16), frameon=False)


# ----------------------------------------------------------------------------- the panel


def plot_diffs(ax, case: CaseRun) -> None:
    """Draws panel (c) for a case with at least one setup."""
    series = difference_series(case)
    if not series:
        ax.text(0.5, 0.5, "one setup only: nothing to compare" if len(case.setups) < 2 else "no common steps",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return
    tolerances = tolerance_lines(case, series)
    scale = log_scale(series, tolerances)
    _draw_axis(ax, scale, len(series))
    for metric, steps, tolerance in tolerances:
        ax.plot(*envelope(steps, tolerance), color="0.3", linestyle="-" if metric == "loss" else "--", linewidth=1.4,
                label=f"tolerance {LABEL[metric]}", zorder=2)
    n_steps = max(len(s.steps) for s in series)
    firsts: dict[str, list[First]] = {}  # setup -> its ringed steps over both metrics
    for j, s in enumerate(series):
        _draw_series(ax, s, scale.lane(j), scale, n_steps)
        for f in _firsts(case, s, scale):
            _ring(ax, f)
            firsts.setdefault(s.setup, []).append(f)
    _annotate_firsts(ax, case, firsts)
    ax.set_ylabel(f"|setup − {case.setups[0].name}|")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, firsts)
