"""Figures, reports and PR evidence over a run directory; reads the record files, never writes them.

A run directory holds `<case>/<setup>/{metrics.csv,run.json}` and `<case>/verdict.json`. This module
draws one figure per case (and, where the setups recorded probes.csv, a heatmap of where they part), writes `report.md` and a self-contained `report.html`, and compares two
runs (`regression.md`). The block pasted into a pull request is parity.report.evidence, built from these pieces.
"""

from __future__ import annotations

import base64
import html
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI runners and test machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from parity.verdict import localize  # noqa: E402

from parity.report import markdown

from parity.core import records
from parity.verdict.compare import bitwise_equal, ensemble_lines, ran_on, statistical_tests  # noqa: E402
from parity.core.paths import inside, name_problem  # noqa: E402
from parity.core.rundir import claim  # noqa: E402
from parity.case.spec import MEMBER_SUFFIX  # noqa: E402

PLOTTED = ("loss", "grad_norm")
LABEL = {"loss": "loss", "grad_norm": "grad norm"}
# Columns compared by the regression report; step_time_s is wall time and differs every run.
NUMERIC = ("loss", "grad_norm", "lr", "tokens")
MARKERS = "osD^vPX*"
LINESTYLES = ("-", "--", "-.", ":")
DPI = 150
COLUMNS = 1000  # buckets a long curve is drawn in (_envelope): about one per pixel column of an axis
MARKED_STEPS = 1000  # curves up to this many steps carry markers
FIGSIZE = (7.2, 9.0)  # inches; at 150 dpi about 1080 px wide, the width of a PR comment


# ----------------------------------------------------------------------------- reading


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
    verdict: dict | None
    setups: list[SetupRun]  # the reference first
    baselines: dict[str, tuple[dict, dict[str, np.ndarray]]] = field(default_factory=dict)  # setup -> (entry, columns)

    @property
    def platform(self) -> str:
        if self.verdict and self.verdict.get("platform"):
            return str(self.verdict["platform"])
        return next((str(s.run["platform"]) for s in self.setups if s.run.get("platform")), "?")


def num(value) -> float | None:
    """A JSON number, or the strings 'nan'/'inf'/'-inf' that records.write_json writes for them."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_case_dir(d: Path) -> bool:
    # A folder whose name no case could have is not one of ours (and its name goes into Markdown).
    return (name_problem(d.name) is None and d.is_dir()
            and ((d / "verdict.json").is_file() or any(d.glob("*/metrics.csv"))))


def find_cases(run_dir) -> list[str]:
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


def load_case_run(run_dir, case: str) -> CaseRun:
    run_dir = Path(run_dir)
    cdir = run_dir / case
    verdict = _read_json_or_empty(cdir / "verdict.json") or None
    # Statistical mode's ensemble members are drawn from the verdict's band, not as setups of their own.
    names = sorted(d.name for d in cdir.iterdir() if d.is_dir() and MEMBER_SUFFIX not in d.name
                   and name_problem(d.name) is None  # a setup's name is checked where its folder is made
                   and ((d / "metrics.csv").is_file() or (d / "run.json").is_file()))
    if verdict:
        # The verdict knows the reference and the case's order; setups it does not name go last.
        order = [verdict.get("reference")] + [p.get("other") for p in verdict.get("pairs", [])]
        order = [n for n in dict.fromkeys(order) if n in names]
        names = order + [n for n in names if n not in order]
    setups = []
    for name in names:
        run = records.read_setup_run(cdir / name, lenient=True)
        setups.append(SetupRun(name, run["info"], run["metrics"] or {}, run["probes"]))
    baselines = {}
    for entry in (verdict or {}).get("baselines", []) or []:
        path = _baseline_path(entry, run_dir)
        if path is None or not entry.get("setup"):
            continue
        try:
            baselines[entry["setup"]] = (entry, records.read_columns(path)[1])
        except records.RecordError:
            pass
    return CaseRun(case, cdir, verdict, setups, baselines)


def _series(columns: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric not in columns:
        return np.empty(0, np.int64), np.empty(0)
    return columns["step"], columns[metric]


def by_step(columns: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps in increasing order, each once, with its last recorded value): what a dict keyed by step holds."""
    steps, values = _series(columns, metric)
    last = _last_rows(steps)
    return steps[last], values[last]


def _last_rows(steps: np.ndarray) -> np.ndarray:
    """The index of each step's last row, in increasing step order."""
    return len(steps) - 1 - np.unique(steps[::-1], return_index=True)[1]


# ----------------------------------------------------------------------------- figure


def verdict_words(v: dict | None) -> str:
    if not v:
        return "no verdict"
    word = "PASS" if v.get("passed") else "FAIL"
    return f"{word} ({v.get('mode', '?')}, expect {v.get('outcome', '?')})"


def _stride(n_steps: int) -> int:
    # About 15 markers per curve: at 80 steps, a marker on every step merged into a thick band.
    return max(1, math.ceil(n_steps / 15))


def _marked(n_steps: int) -> bool:
    """Whether curves of this length carry markers; longer ones are lines, told apart by colour and dash."""
    return n_steps <= MARKED_STEPS


def _envelope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points of a long series worth drawing: per bucket of consecutive points (COLUMNS of them, about
    one per pixel column), its lowest, its highest and its first NaN, in step order. A spike stays as tall
    as it is, a NaN still breaks the line, and 10^5 points draw as fast as a few thousand."""
    n = len(y)
    if n <= 4 * COLUMNS:
        return x, y
    size = -(-n // COLUMNS)
    padded = np.concatenate([y, np.full(size * COLUMNS - n, np.nan)]).reshape(COLUMNS, size)
    nan = np.isnan(padded)
    start = np.arange(COLUMNS) * size
    keep = np.concatenate([start + np.argmin(np.where(nan, np.inf, padded), axis=1),
                           start + np.argmax(np.where(nan, -np.inf, padded), axis=1),
                           (start + np.argmax(nan, axis=1))[nan.any(axis=1)], [0, n - 1]])
    keep = np.unique(keep[keep < n])  # the padding's NaNs are no points
    return x[keep], y[keep]


def _one_per_column(x: np.ndarray) -> np.ndarray:
    """Marker positions, at most one per pixel column (COLUMNS across the series' span, the first in each):
    markers that would be drawn over one another anyway. None of the columns that hold one goes empty."""
    if len(x) <= 4 * COLUMNS:
        return x
    column = (x - x.min()) * COLUMNS // max(1, x.max() - x.min() + 1)
    return x[np.flatnonzero(np.diff(column, prepend=-1))]


def _style(i: int, k: int, n_steps: int) -> dict:
    """Setup i of k: its own colour, marker, dash and a smaller marker than the one before.

    In a bitwise case every curve lies on the reference. Drawing later setups with thinner
    dashes and smaller markers on top leaves each earlier one visible as a rim around it, and
    staggering which steps carry markers keeps long runs readable. Curves longer than
    MARKED_STEPS have no markers: the dashes and widths alone keep them apart.
    """
    stride = _stride(n_steps)
    marks = {
        "marker": MARKERS[i % len(MARKERS)],
        "markersize": max(4.0, 10.0 - 6.0 * i / max(1, k - 1)) if k > 1 else 7.0,
        "markeredgecolor": "white",  # a light rim separates a marker from the larger one beneath it
        "markeredgewidth": 0.7,
        "markevery": (round(i * stride / max(1, k)) % stride, stride),
    }
    return {
        "color": f"C{i % 10}",
        **(marks if _marked(n_steps) else {"marker": "none"}),
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "linewidth": max(0.8, 2.6 - 0.6 * i),
        "zorder": 3 + i,
    }


def _plot_values(ax, c: CaseRun, metric: str, n_steps: int) -> None:
    k = len(c.setups)
    for i, s in enumerate(c.setups):
        st = _style(i, k, n_steps)
        if s.name in c.baselines:
            entry, columns = c.baselines[s.name]
            x, y = _series(columns, metric)
            if len(x):
                # Hollow, larger and dotted, so the run drawn over it stays visible inside it.
                marks = ({"marker": st["marker"], "markersize": st["markersize"] + 4, "markerfacecolor": "none",
                          "markeredgewidth": 1.2, "markevery": st["markevery"]} if _marked(n_steps) else {})
                label = f"{s.name} baseline ({entry.get('platform') or '?'}, {entry.get('status', '?')})"
                ax.plot(*_envelope(x, y), color=st["color"], **marks, linestyle=":", linewidth=1.0, zorder=2,
                        alpha=0.9, label=label)
        x, y = _series(s.metrics, metric)
        if len(x):
            ax.plot(*_envelope(x, y), label=s.name, **st)
    ax.set_ylabel(LABEL[metric])
    ax.grid(True, alpha=0.3)
    # A setup that blows up flattens every other curve onto zero on a linear axis.
    ys = np.concatenate([np.asarray(ln.get_ydata(), dtype=np.float64) for ln in ax.get_lines()] or [np.empty(0)])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if ys.size and ys.max() / ys.min() > 1e3:
        ax.set_yscale("log")


def _diffs(ref: SetupRun, other: SetupRun, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common steps, |other - ref|, and |ref| (for the tolerance at each step)."""
    ref_steps, r = by_step(ref.metrics, metric)
    other_steps, o = by_step(other.metrics, metric)
    steps, i, j = np.intersect1d(ref_steps, other_steps, assume_unique=True, return_indices=True)
    r, o = r[i], o[j]
    with np.errstate(invalid="ignore", over="ignore"):
        return steps, np.where(o != r, np.abs(o - r), 0.0), np.abs(r)


def _tolerance(c: CaseRun, metric: str) -> tuple[float, float] | None:
    # Only a tolerance-mode case has a band to stay inside; in bitwise mode any difference fails.
    v = c.verdict or {}
    t = (v.get("tolerance") or {}).get(metric)
    if v.get("mode") != "tolerance" or not t:
        return None
    rtol, atol = num(t.get("rtol")), num(t.get("atol"))
    return None if rtol is None or atol is None else (rtol, atol)


def _verdict_divergence(c: CaseRun, other: str) -> tuple[str, int] | None:
    for p in (c.verdict or {}).get("pairs", []) or []:
        d = p.get("diverged") if p.get("other") == other else None
        if d and d.get("metric") in PLOTTED and d.get("step") is not None:
            return d["metric"], int(d["step"])
    return None


def _plot_diffs(ax, c: CaseRun) -> None:
    ref, others = c.setups[0], [s for s in c.setups[1:] if s.steps]
    series = []  # (setup, metric, steps, diffs, colour, marker, linestyle)
    tol_lines = []  # (metric, steps, tolerance per step)
    for metric, ls, mk in (("loss", "-", "o"), ("grad_norm", "--", "s")):
        for s in others:
            steps, d, mag = _diffs(ref, s, metric)
            if len(steps):
                i = c.setups.index(s)
                series.append((s.name, metric, steps, d, f"C{i % 10}", mk, ls))
                tol = _tolerance(c, metric)
                if tol and not any(t[0] == metric for t in tol_lines):
                    tol_lines.append((metric, steps, tol[1] + tol[0] * mag))
    if not series:
        ax.text(0.5, 0.5, "one setup only: nothing to compare" if len(c.setups) < 2 else "no common steps",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return

    # Exact (bitwise-equal) steps have no logarithm. They go in a shaded band under `floor`, one
    # lane per series, so "equal" is drawn explicitly rather than silently dropped.
    positive = np.concatenate([d for _, _, _, d, *_ in series] + [tl for _, _, tl in tol_lines])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    lo = float(positive.min()) if positive.size else 1e-12
    hi = float(positive.max()) if positive.size else lo * 1e4
    floor = 10 ** (math.floor(math.log10(lo)) - 1)
    top = 10 ** (math.ceil(math.log10(hi)) + 2)  # headroom for the divergence labels along the top
    lane = 10 ** 0.35  # factor between lanes on the log axis
    bottom = floor / lane ** (len(series) + 1)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.axhspan(bottom, floor, color="0.9", zorder=0)
    # The label sits where the y tick labels are (blanked in the band), clear of the lane markers.
    trans = blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(-0.012, floor / lane ** ((len(series) + 1) / 2), "exact", transform=trans,
            fontsize=9, va="center", ha="right", color="0.25")
    if not positive.size:
        ax.text(0.5, 0.6, "every compared step is bitwise equal", transform=ax.transAxes,
                ha="center", va="center", fontsize=10, color="darkgreen")
    # Tick labels inside the band would read as real magnitudes; blank them.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: "" if y < floor * 0.999 else f"1e{math.log10(y):.0f}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))

    for metric, steps, tl in tol_lines:
        ax.plot(*_envelope(steps, tl), color="0.3", linestyle="-" if metric == "loss" else "--", linewidth=1.4,
                label=f"tolerance {LABEL[metric]}", zorder=2)

    n_steps = max(len(x[2]) for x in series)
    marked = _marked(n_steps)
    firsts = {}  # setup -> (step, metric, y) of its earliest difference over both metrics
    for j, (name, metric, steps, d, color, mk, ls) in enumerate(series):
        lane_y = floor / lane ** (j + 1)
        finite = np.isfinite(d) & (d > 0)
        exact = steps[d == 0]
        bad = steps[~np.isfinite(d)]  # NaN/Inf: drawn at the top
        ax.plot(*_envelope(steps[finite], d[finite]), color=color, marker=mk if marked else "none", linestyle=ls,
                markersize=5, markevery=_stride(n_steps) if marked else None, linewidth=1.4,
                label=f"{name} {LABEL[metric]}", zorder=4)
        if exact.size:
            # Every exact step gets its mark (thinned to one per pixel column only where they would overlap):
            # "equal here" is the claim being shown.
            exact = _one_per_column(exact)
            ax.plot(exact, np.full(len(exact), lane_y), color=color, linestyle="none", zorder=4,
                    **(dict(marker=mk, markersize=4, markerfacecolor="none") if len(steps) <= 30
                       else dict(marker="|", markersize=4.5)))
        if bad.size:
            bad = _one_per_column(bad)
            ax.plot(bad, np.full(len(bad), top / lane), color=color, marker="X", linestyle="none", markersize=7,
                    zorder=4, label=f"{name} {LABEL[metric]} not finite")
        differing = np.flatnonzero(d != 0)
        if not differing.size:
            continue
        first = int(steps[differing[0]])
        y_first = float(d[differing[0]]) if finite[differing[0]] else top / lane
        ax.plot([first], [y_first], marker="o", markersize=13, markerfacecolor="none",
                markeredgecolor="crimson", markeredgewidth=1.6, linestyle="none", zorder=5)
        if name not in firsts or first < firsts[name][0]:
            firsts[name] = (first, metric, y_first)
    # One label per setup, in a row along the top where the decade of headroom leaves room,
    # with a leader to the point (over the data they hid the curves); ordered by step so
    # the leaders do not cross.
    for n, (name, (first, metric, y_first)) in enumerate(sorted(firsts.items(), key=lambda kv: kv[1][0])):
        text = f"{name}: first divergence\n{LABEL[metric]}, step {first}"
        vd = _verdict_divergence(c, name)
        if vd and vd != (metric, first):
            # In tolerance mode the verdict's divergence is the first step beyond tolerance.
            text += f"\nbeyond tolerance: {LABEL[vd[0]]}, step {vd[1]}"
        ax.annotate(text, (first, y_first), xytext=(0.02 + 0.32 * n, 0.95), textcoords="axes fraction",
                    va="top", fontsize=8, color="crimson",
                    bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="crimson", lw=0.6, alpha=0.9),
                    arrowprops=dict(arrowstyle="-", color="crimson", lw=0.8, shrinkB=7), zorder=6)
    ax.set_ylabel(f"|setup − {ref.name}|")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if firsts:
        handles.append(Line2D([], [], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="crimson",
                              linestyle="none"))
        labels.append("first divergence")
    ax.legend(handles, labels, fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.16), frameon=False)


def build_figure(run_dir, case_name: str, c: CaseRun | None = None):
    """The case's figure: axes[0] loss, axes[1] grad norm, axes[2] |difference| to the reference.
    `c`: the case's records (load_case_run), where the caller has read them already."""
    c = c or load_case_run(run_dir, case_name)
    if (c.verdict or {}).get("statistical"):
        from parity.report.bandplot import build_band_figure  # it draws with this module's styles

        return build_band_figure(c)
    n_steps = max((s.steps for s in c.setups), default=0)
    fig, axes = plt.subplots(3, 1, figsize=FIGSIZE, sharex=True, height_ratios=(1, 1, 1.25))
    _plot_values(axes[0], c, "loss", n_steps)
    _plot_values(axes[1], c, "grad_norm", n_steps)
    if c.setups:
        _plot_diffs(axes[2], c)
    axes[0].legend(fontsize=7.5, ncol=2, loc="best", framealpha=0.85)
    axes[2].set_xlabel("step")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].tick_params(labelbottom=True)
    bitwise = (c.verdict or {}).get("mode") == "bitwise"
    titles = ("(a) loss", "(b) grad norm (pre-clip)",
              "(c) |difference| to the reference" + (": bitwise mode, any difference fails" if bitwise else ""))
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9, loc="left")
    passed = (c.verdict or {}).get("passed")
    fig.suptitle(f"{c.name}: {' vs '.join(s.name for s in c.setups)}\n"
                 f"platform {c.platform} · {verdict_words(c.verdict)}",
                 fontsize=10.5, color={True: "darkgreen", False: "firebrick"}.get(passed, "black"))
    fig.tight_layout()
    return fig


def _save_atomic(fig, path: Path, fmt: str) -> None:
    with records.atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=DPI)


def plot_case(run_dir, case_name: str, c: CaseRun | None = None) -> tuple[Path, Path]:
    """Writes `<run_dir>/<case>/<case>.png` and `.svg`; returns their paths."""
    return _save_figure(build_figure(run_dir, case_name, c), inside(run_dir, case_name, case_name))


def _save_figure(fig, base: Path) -> tuple[Path, Path]:
    """`base`.png and .svg, each written atomically; the figure is closed either way."""
    try:
        _save_atomic(fig, base.with_suffix(".png"), "png")
        _save_atomic(fig, base.with_suffix(".svg"), "svg")
    finally:
        plt.close(fig)
    return base.with_suffix(".png"), base.with_suffix(".svg")


# ----------------------------------------------------------------------------- probes heatmap

EXACT_COLOUR, MISSING_COLOUR, FIRST_COLOUR = "white", "0.72", "crimson"


def _pair(c: CaseRun, other: str) -> dict:
    return next((p for p in (c.verdict or {}).get("pairs", []) or [] if p.get("other") == other), {})


def _probe_panels(c: CaseRun) -> list[tuple[SetupRun, dict, dict | None, str]]:
    """(setup, matrix, first divergence, line) per non-reference setup that has probes to compare."""
    ref = c.setups[0] if c.setups else None
    if ref is None or ref.probes is None:
        return []
    panels = []
    for s in c.setups[1:]:
        if s.probes is None:
            continue
        # The verdict's localization is the judged one (its mode and tolerances); an unjudged run is localized bitwise.
        loc = _pair(c, s.name).get("localization") or localize.localize(ref.probes, s.probes, "bitwise", {},
                                                                          (ref.name, s.name))
        tolerances = _probe_tolerances(c) if loc.get("mode") == "tolerance" else None
        m = localize.matrix(ref.probes, s.probes, "tolerance" if tolerances else "bitwise", tolerances)
        m["tolerance"] = tolerances is not None
        panels.append((s, m, loc.get("first"), loc.get("line", "")))
    return panels


def _probe_tolerances(c: CaseRun) -> dict | None:
    """The verdict's probe tolerance per phase; None when it has not all of them (a verdict from before probes)."""
    from parity.case.spec import Tolerance

    t = (c.verdict or {}).get("tolerance") or {}
    bounds = {p: (num((t.get(p) or {}).get("rtol")), num((t.get(p) or {}).get("atol"))) for p in records.PROBE_PHASES}
    if any(None in b for b in bounds.values()):
        return None
    return {p: Tolerance(*b) for p, b in bounds.items()}


def build_probes_figure(run_dir, case_name: str, c: CaseRun | None = None):
    """|relative difference| of every probe to the reference: rows in causal order within a step, grouped by
    phase, probed steps as columns, one panel per non-reference setup; None when there are no probes. `c` as
    for build_figure."""
    c = c or load_case_run(run_dir, case_name)
    panels = _probe_panels(c)
    if not panels:
        return None
    n_rows = max(len(m["rows"]) for _, m, _, _ in panels)
    n_cols = max(len(m["steps"]) for _, m, _, _ in panels)
    # Laid out in inches: the names on the left, the phases and the colour bar on the right.
    left, right, top, bottom, gap = 2.3, 1.7, 1.3, 0.9, 0.15
    panel, height = min(8.0, max(2.4, 0.3 * n_cols + 0.6)), max(2.0, 0.11 * n_rows)  # 71 probed steps stay 8 in
    width = left + right + len(panels) * panel + (len(panels) - 1) * gap
    fig, axes = plt.subplots(1, len(panels), figsize=(width, top + height + bottom), squeeze=False, sharey=True)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / fig.get_figheight(),
                        bottom=bottom / fig.get_figheight(), wspace=gap / panel)
    positive = np.concatenate([m["rel"][(m["rel"] > 0) & ~m["exact"]].ravel() for _, m, _, _ in panels])
    positive = positive[np.isfinite(positive)]
    norm = None  # one scale for every panel, so their colours compare
    if positive.size:
        lo, hi = float(positive.min()), float(positive.max())
        norm = LogNorm(lo if hi > lo else lo / 10, hi if hi > lo else hi * 10)
    image = None
    for ax, (s, m, first, line) in zip(axes[0], panels):
        image = _probe_panel(ax, m, first, norm) or image
        ax.set_title(f"{s.name} vs {c.setups[0].name}\n" + "\n".join(_wrap(line, int(panel * 15))), fontsize=7.5,
                     loc="left")
    _phase_labels(axes[0][-1], panels[-1][1]["rows"])
    if image is not None:
        bar = fig.colorbar(image, cax=fig.add_axes([1 - (right - 0.55) / width, bottom / fig.get_figheight(),
                                                    0.15 / width, height / fig.get_figheight()]))
        bar.set_label("|other − reference| / |reference|", fontsize=8)
    else:
        fig.text(0.5, 0.35 / fig.get_figheight(), "every compared probe is bitwise equal", ha="center", fontsize=9,
                 color="darkgreen")
    legend = [Patch(facecolor=EXACT_COLOUR, edgecolor="0.5", label="exact (bitwise equal)"),
              Patch(facecolor=MISSING_COLOUR, edgecolor="0.5", label="missing / not finite"),
              Patch(facecolor="none", edgecolor=FIRST_COLOUR, linewidth=2, label="first divergence")]
    if any(m["tolerance"] for _, m, _, _ in panels):
        legend.append(Line2D([], [], linestyle="none", marker="o", markersize=3, color="black",
                             label="beyond tolerance"))
    fig.legend(handles=legend, loc="lower left", ncol=len(legend), fontsize=7.5, frameon=False)
    passed = (c.verdict or {}).get("passed")
    fig.suptitle(f"{c.name}: probes in causal order · {verdict_words(c.verdict)}", fontsize=10,
                 color={True: "darkgreen", False: "firebrick"}.get(passed, "black"))
    return fig


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _probe_panel(ax, m: dict, first: dict | None, norm):
    """One setup's matrix: exact cells white, differing ones coloured by |rel| (log), the rest grey."""
    rel, exact = m["rel"], m["exact"]
    ax.set_facecolor(MISSING_COLOUR)  # a cell left undrawn (NaN is transparent) is missing or not finite
    show = dict(aspect="auto", interpolation="nearest")
    ax.imshow(np.where(exact, 1.0, np.nan), cmap=ListedColormap([EXACT_COLOUR]), **show)
    image = None
    differing = ~exact & ~np.isnan(rel)
    if norm is not None and differing.any():
        # A difference with rel 0 (-0.0 against 0.0) or inf (against a zero reference) sits at the scale's ends.
        values = np.clip(np.where(differing, rel, np.nan), norm.vmin, norm.vmax)
        image = ax.imshow(values, cmap="viridis", norm=norm, **show)
    rows, steps = m["rows"], m["steps"]
    phases = [r[0] for r in rows]
    for i in range(1, len(rows)):
        if phases[i] != phases[i - 1]:
            ax.axhline(i - 0.5, color="black", linewidth=1.2)
    ax.set_yticks(range(len(rows)), [name if stat == "sumsq" else f"{name} ({stat})" for _, name, stat in rows],
                  fontsize=5 if len(rows) > 40 else 7)
    shown = range(0, len(steps), math.ceil(len(steps) / 24))  # at most 24 step labels: they stay readable
    ax.set_xticks(shown, [str(steps[j]) for j in shown], fontsize=7)
    ax.set_xlabel("probed step", fontsize=8)
    if m["tolerance"]:
        # In tolerance mode colour alone cannot say which differences fail: those beyond their phase's bound get a dot.
        i, j = np.nonzero(~m["agree"] & ~np.isnan(rel))
        ax.plot(j, i, linestyle="none", marker="o", markersize=2.2, color="black", zorder=4)
    if first is not None:
        key = (first["phase"], first["name"], first["stat"])
        if key in rows and first["step"] in steps:
            i, j = rows.index(key), steps.index(first["step"])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=FIRST_COLOUR, linewidth=2.2,
                                   zorder=5))
    return image


def _phase_labels(ax, rows: list[tuple]) -> None:
    """The phase of each group of rows, on the right of the last panel."""
    spans: dict = {}
    for i, (phase, _, _) in enumerate(rows):
        spans.setdefault(phase, [i, i])[1] = i
    trans = blended_transform_factory(ax.transAxes, ax.transData)
    for phase, (a, b) in spans.items():
        ax.text(1.04, (a + b) / 2, phase, transform=trans, rotation=-90, va="center", ha="left", fontsize=8)


def plot_probes(run_dir, case_name: str, c: CaseRun | None = None) -> tuple[Path, Path] | None:
    """Writes `<run_dir>/<case>/<case>-probes.png` and `.svg` when the setups recorded probes; None otherwise."""
    fig = build_probes_figure(run_dir, case_name, c)
    if fig is None:
        return None
    return _save_figure(fig, inside(run_dir, case_name, f"{case_name}-probes"))


# ----------------------------------------------------------------------------- summary rows


def fmt(value) -> str:
    v = num(value)
    if v is None:
        return "—"
    return "0" if v == 0 else f"{v:.3e}"


def _max_rel(v: dict | None, metric: str):
    vals = [num(((p.get("metrics") or {}).get(metric) or {}).get("max_rel")) for p in (v or {}).get("pairs", []) or []]
    vals = [x for x in vals if x is not None]
    # NaN compares false with everything; a NaN difference is the worst one, so it wins.
    return next((x for x in vals if math.isnan(x)), max(vals, default=None))


def _divergence_text(v: dict | None) -> str:
    parts = []
    beyond = " (beyond tolerance)" if (v or {}).get("mode") == "tolerance" else ""
    for p in (v or {}).get("pairs", []) or []:
        d = p.get("diverged")
        if d:
            where = f"step {d['step']}" if d.get("step") is not None else f"param {d.get('param')}"
            parts.append(f"{p.get('other')}: {d.get('metric')} {where}{beyond}")
        elif ((p.get("localization") or {}).get("first")) and not p.get("passed"):
            f = p["localization"]["first"]  # the metrics agree, the probes do not: say where they part
            parts.append(f"{p.get('other')}: probes step {f['step']}, {f['phase']}, {f['name']}{beyond}")
    return "; ".join(parts) or "—"


def summary_row(c: CaseRun) -> dict:
    v = c.verdict
    return {
        "case": c.name,
        "setups": ", ".join(s.name for s in c.setups),
        "mode": (v or {}).get("mode", "—"),
        "verdict": ("PASS" if v.get("passed") else "FAIL") if v else "no verdict",
        "ran on": ran_on(v) if v else "—",
        "max rel diff loss": fmt(_max_rel(v, "loss")),
        "max rel diff grad norm": fmt(_max_rel(v, "grad_norm")),
        "first divergence": _divergence_text(v),
    }


SUMMARY_COLUMNS = ("case", "setups", "mode", "verdict", "ran on", "max rel diff loss", "max rel diff grad norm", "first divergence")


def _md_cell(value) -> str:
    return markdown.cell(value)


def md_table(columns, rows) -> str:
    # GitHub renders the emoji; the HTML report colours the word instead, since a machine
    # without an emoji font (headless CI) shows an empty box.
    rows = [{**r, "verdict": {"PASS": "✅ PASS", "FAIL": "❌ FAIL"}.get(r["verdict"], r["verdict"])} if "verdict" in r else r
            for r in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _same_or_each(c: CaseRun, key: str) -> str:
    vals = [str(s.run.get(key)) for s in c.setups if s.run.get(key) not in (None, "")]
    uniq = list(dict.fromkeys(vals))
    return " / ".join(uniq) if uniq else "—"


def commands(c: CaseRun, run_dir) -> list[str]:
    """The commands that reproduce the case, from run.json; the CLI invocation when none is recorded."""
    cmds = [shlex.join(map(str, s.run["command"])) for s in c.setups if s.run.get("command")]
    if cmds:
        return list(dict.fromkeys(cmds))
    case_path = next((s.run.get("case_path") for s in c.setups if s.run.get("case_path")), f"cases/{c.name}.toml")
    return [shlex.join(["parity", "run", str(case_path), "--out", str(run_dir)])]


def _mesh(run: dict) -> str:
    shape, names = run.get("mesh_shape"), run.get("mesh_dim_names")
    if not shape:
        return "—"
    if names and len(names) == len(shape):
        return " × ".join(f"{n}={s}" for n, s in zip(names, shape))
    return " × ".join(map(str, shape))


def provenance(c: CaseRun, run_dir) -> dict:
    """Shared facts about the case's runs (values that differ between setups are joined by ' / ')."""
    return {
        "torch": _same_or_each(c, "torch"),
        "device": _same_or_each(c, "device"),
        "platform": c.platform,
        "backend": _same_or_each(c, "backend"),
        "python": _same_or_each(c, "python"),
        "seed checkpoint sha256": _same_or_each(c, "seed_checkpoint_sha256"),
        "case sha256": _same_or_each(c, "case_sha256"),
        "git commit": _same_or_each(c, "git_commit"),
        "command": commands(c, run_dir),
    }


SETUP_COLUMNS = ("setup", "status", "world size", "mesh", "peak memory", "trained as", "started", "ended")
# run.json "peak_memory": {"measure": one of these, "per_rank_bytes": [int, ...], "max_bytes": int}
MEMORY_MEASURES = {"host_rss": "host RSS", "cuda_max_allocated": "CUDA max allocated"}


def setup_rows(c: CaseRun) -> list[dict]:
    # "trained as": the suite planner trained this setup once, for another case that names it too.
    return [{"setup": s.name, "status": s.run.get("status", "—"), "world size": s.run.get("world_size", "—"),
             "mesh": _mesh(s.run), "peak memory": peak_memory(s.run), "trained as": s.run.get("trained_as", "—"),
             "started": s.run.get("started", "—"), "ended": s.run.get("ended", "—")}
            for s in c.setups]


def peak_memory(run: dict) -> str:
    """The largest peak over the setup's ranks, e.g. "412 MiB (host RSS)"; "—" where run.json has none
    (older runs, setups run by another trainer or command)."""
    peak = run.get("peak_memory")
    if not isinstance(peak, dict):
        return "—"
    per_rank = [b for b in peak.get("per_rank_bytes") or [] if isinstance(b, int) and not isinstance(b, bool)]
    largest = max(per_rank, default=peak.get("max_bytes"))
    if not isinstance(largest, int) or isinstance(largest, bool):
        return "—"
    measure = peak.get("measure")
    return f"{largest / 2**20:.0f} MiB ({MEMORY_MEASURES.get(measure, str(measure))})"


PAIR_COLUMNS = ("pair", "passed", "loss max abs", "loss max rel", "grad norm max abs", "grad norm max rel",
                "exact steps", "probes", "problems")


def pair_rows(c: CaseRun) -> list[dict]:
    rows = []
    for p in (c.verdict or {}).get("pairs", []) or []:
        m = p.get("metrics") or {}
        loss, gn = m.get("loss") or {}, m.get("grad_norm") or {}
        rows.append({
            "pair": f"{p.get('other')} vs {p.get('reference')}",
            "passed": "yes" if p.get("passed") else "no",
            "loss max abs": fmt(loss.get("max_abs")), "loss max rel": fmt(loss.get("max_rel")),
            "grad norm max abs": fmt(gn.get("max_abs")), "grad norm max rel": fmt(gn.get("max_rel")),
            "exact steps": f"{loss.get('exact_equal_steps', '?')}/{loss.get('n', '?')} loss, "
                           f"{gn.get('exact_equal_steps', '?')}/{gn.get('n', '?')} grad norm",
            "probes": _probes_text(p.get("localization")),
            "problems": "; ".join(p.get("problems") or []) or "—",
        })
    return rows


def _probes_text(loc: dict | None) -> str:
    """Where the pair's probes first part, with the entries just before it and any probe problems."""
    if not loc:
        return "—"  # a verdict written before probes
    text = loc.get("line", "—")
    if loc.get("before"):
        text += " (before it: " + ", ".join(f"{e['phase']} {e['name']} " + (
            "exact" if bitwise_equal(num(e["value_ref"]), num(e["value_other"])) else f"rel {localize.rel_text(num(e['rel']))}")
            for e in loc["before"]) + ")"
    return "; ".join([text] + [f"problem: {q}" for q in loc.get("problems") or []])


def ensemble_text(c: CaseRun) -> list[str]:
    """Statistical mode: the ensemble and the test, then each setup's largest |z| and windows outside the band."""
    v = c.verdict or {}
    if not v.get("statistical"):
        return []
    lines = [line.strip() for line in ensemble_lines(v["statistical"])]
    for name, tests in list(statistical_tests(v).items())[1:]:  # the reference's own test is in ensemble_lines
        lines.append(f"{name}: " + "; ".join(
            f"{LABEL[m]} max |z| {fmt(t['max_abs_z'])}, {t['failing_windows']} of {len(t['z'])} windows outside"
            for m, t in tests.items() if t) if any(tests.values()) else f"{name}: not tested")
    return lines


BASELINE_COLUMNS = ("setup", "platform", "status", "message")


def baseline_rows(c: CaseRun) -> list[dict]:
    return [{"setup": b.get("setup", "?"), "platform": b.get("platform", "?"), "status": b.get("status", "?"),
             "message": b.get("message") or "—"} for b in (c.verdict or {}).get("baselines", []) or []]


# ----------------------------------------------------------------------------- report


def _load_all(run_dir) -> list[CaseRun]:
    return [load_case_run(run_dir, name) for name in find_cases(run_dir)]


def _figure_or_none(run_dir, c: CaseRun) -> Path | None:
    if not any(s.steps for s in c.setups):
        return None
    return plot_case(run_dir, c.name, c)[0]


def _probes_or_none(run_dir, c: CaseRun) -> Path | None:
    found = plot_probes(run_dir, c.name, c)
    return found[0] if found else None


def _md_case(c: CaseRun, run_dir, png: Path | None, probes_png: Path | None = None) -> list[str]:
    out = [f"## {c.name}", "", f"**{markdown.text(verdict_words(c.verdict))}** · setups: {', '.join(s.name for s in c.setups)}", ""]
    problems = (c.verdict or {}).get("problems") or []
    if problems:
        out += ["Problems:", ""] + [f"- {markdown.text(p)}" for p in problems] + [""]
    if png:
        rel = png.relative_to(Path(run_dir)).as_posix()
        out += [f"![{c.name}]({rel})", "", f"[SVG]({Path(rel).with_suffix('.svg').as_posix()})", ""]
    else:
        out += ["_No metrics recorded: no figure._", ""]
    if probes_png:
        rel = probes_png.relative_to(Path(run_dir)).as_posix()
        out += [f"![{c.name} probes]({rel})", "", f"[SVG]({Path(rel).with_suffix('.svg').as_posix()})", ""]
    if pair_rows(c):
        out += [md_table(PAIR_COLUMNS, pair_rows(c)), ""]
    if ensemble := ensemble_text(c):
        out += ["Ensemble:", ""] + [f"- {markdown.text(line)}" for line in ensemble] + [""]
    if baseline_rows(c):
        out += ["Baselines:", "", md_table(BASELINE_COLUMNS, baseline_rows(c)), ""]
    prov = provenance(c, run_dir)
    out += ["Provenance:", ""]
    out += [f"- {k}: {markdown.code(v)}" for k, v in prov.items() if k != "command"]
    out += ["", md_table(SETUP_COLUMNS, setup_rows(c)), "", "Reproduce:", "", *markdown.fence(prov["command"], "sh"), ""]
    return out


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    cls = {"PASS": ' class="pass"', "FAIL": ' class="fail"'}
    body = "".join("<tr>" + "".join(f"<td{cls.get(r[c], '') if c == 'verdict' else ''}>{html.escape(str(r[c]))}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto}img{max-width:100%;height:auto;border:1px solid #eee}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}section{border-top:1px solid #ddd;margin-top:2em}
"""


def _html_case(c: CaseRun, run_dir, png: Path | None, probes_png: Path | None = None) -> str:
    e = html.escape
    passed = (c.verdict or {}).get("passed")
    cls = {True: "pass", False: "fail"}.get(passed, "")
    parts = [f'<section id="case-{e(c.name)}"><h2>{e(c.name)}</h2>',
             f'<p><strong class="{cls}">{e(verdict_words(c.verdict))}</strong> · setups: {e(", ".join(s.name for s in c.setups))}</p>']
    problems = (c.verdict or {}).get("problems") or []
    if problems:
        parts.append("<ul>" + "".join(f"<li>{e(p)}</li>" for p in problems) + "</ul>")
    if png:
        # Embedded, not linked: the file must open from disk, from an artifact, anywhere.
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<img alt="{e(c.name)} figure" src="data:image/png;base64,{data}">')
    else:
        parts.append("<p><em>No metrics recorded: no figure.</em></p>")
    if probes_png:
        data = base64.b64encode(probes_png.read_bytes()).decode("ascii")
        parts.append(f'<img alt="{e(c.name)} probes heatmap" src="data:image/png;base64,{data}">')
    if pair_rows(c):
        parts.append(_html_table(PAIR_COLUMNS, pair_rows(c)))
    if ensemble := ensemble_text(c):
        parts.append("<h3>Ensemble</h3><ul>" + "".join(f"<li>{e(line)}</li>" for line in ensemble) + "</ul>")
    if baseline_rows(c):
        parts.append("<h3>Baselines</h3>" + _html_table(BASELINE_COLUMNS, baseline_rows(c)))
    prov = provenance(c, run_dir)
    parts.append("<h3>Provenance</h3><ul>" + "".join(
        f"<li>{e(k)}: <code>{e(str(v))}</code></li>" for k, v in prov.items() if k != "command") + "</ul>")
    parts.append(_html_table(SETUP_COLUMNS, setup_rows(c)))
    parts.append("<h3>Reproduce</h3><pre>" + e("\n".join(prov["command"])) + "</pre></section>")
    return "\n".join(parts)


def write_report(run_dir) -> tuple[Path, Path]:
    """Draws every case's figure and writes `<run_dir>/report.md` and a self-contained `report.html`."""
    run_dir = Path(run_dir)
    cases = _load_all(run_dir)
    pngs = {c.name: _figure_or_none(run_dir, c) for c in cases}
    probe_pngs = {c.name: _probes_or_none(run_dir, c) for c in cases}
    rows = [summary_row(c) for c in cases]
    n_pass = sum(1 for c in cases if c.verdict and c.verdict.get("passed"))
    n_none = sum(1 for c in cases if not c.verdict)
    headline = f"{len(cases)} cases · {n_pass} passed · {len(cases) - n_pass - n_none} failed"
    headline += f" · {n_none} without verdict" if n_none else ""

    md = ["# Parity report", "", f"Run directory: {markdown.code(run_dir)} · {headline}", "", md_table(SUMMARY_COLUMNS, rows), ""]
    for c in cases:
        md += _md_case(c, run_dir, pngs[c.name], probe_pngs[c.name])
    md_path = claim(run_dir, "report.md")
    records.atomic_write_text(md_path, "\n".join(md))

    e = html.escape
    body = [f"<h1>Parity report</h1><p>Run directory: <code>{e(str(run_dir))}</code> · {e(headline)}</p>",
            _html_table(SUMMARY_COLUMNS, rows)]
    body += [_html_case(c, run_dir, pngs[c.name], probe_pngs[c.name]) for c in cases]
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Parity report</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    html_path = claim(run_dir, "report.html")
    records.atomic_write_text(html_path, page)
    return md_path, html_path


# ----------------------------------------------------------------------------- regression


def _compare_setup(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> list[str]:
    """Markdown lines describing how one setup's metrics changed; [] when bitwise identical."""
    lines = []
    new_steps, old_steps = new.get("step", np.empty(0, np.int64)), old.get("step", np.empty(0, np.int64))
    new_last, old_last = _last_rows(new_steps), _last_rows(old_steps)
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
        lines.append(f"{metric}: {len(changed)}/{len(common)} steps changed, max abs {fmt(_worst(abs_d))}, "
                     f"max rel {fmt(_worst(rel_d))}, first at step {common[k]} "
                     f"({before[k].item()!r} → {now[k].item()!r})")
    return lines


def _worst(values: np.ndarray) -> float:
    """The largest value, NaN counting as larger than any (the first of equals, as max() picks)."""
    return float(values[np.argmax(np.where(np.isnan(values), np.inf, values))])


def _weights_changes(new_dir: Path, old_dir: Path) -> list[str]:
    try:
        new = {r["param"]: r["sha256"] for r in records.read_weights(new_dir / "weights.csv")}
        old = {r["param"]: r["sha256"] for r in records.read_weights(old_dir / "weights.csv")}
    except records.RecordError:
        return []  # one side has no weights file: nothing to compare
    changed = sorted(p for p in set(new) | set(old) if new.get(p) != old.get(p))
    return [f"weights: {len(changed)} parameters changed, first {changed[0]}"] if changed else []


def regression_report(new_dir, old_dir) -> tuple[str, list[str]]:
    """Cases whose verdict or numbers changed from `old_dir` to `new_dir`; writes `<new_dir>/regression.md`."""
    new_dir, old_dir = Path(new_dir), Path(old_dir)
    new_cases, old_cases = set(find_cases(new_dir)), set(find_cases(old_dir))
    changed, sections, unchanged = [], [], 0
    for name in sorted(new_cases & old_cases):
        new, old = load_case_run(new_dir, name), load_case_run(old_dir, name)
        lines = []
        pv, nv = (old.verdict or {}).get("passed"), (new.verdict or {}).get("passed")
        if pv != nv:
            lines.append(markdown.text(f"verdict: {verdict_words(old.verdict)} → {verdict_words(new.verdict)}"))
        old_setups = {s.name: s for s in old.setups}
        new_setups = {s.name: s for s in new.setups}
        for setup in sorted(set(old_setups) | set(new_setups)):
            if setup not in new_setups or setup not in old_setups:
                lines.append(f"setup `{setup}` only in the {'old' if setup in old_setups else 'new'} run")
                continue
            diffs = _compare_setup(new_setups[setup].metrics, old_setups[setup].metrics)
            diffs += _weights_changes(new_dir / name / setup, old_dir / name / setup)
            lines += [f"`{setup}` {markdown.text(d)}" for d in diffs]
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
