"""A case's figure: (a) loss and (b) grad norm of every setup over the steps, each over its stored baseline, and
(c) each setup's |difference| to the reference (parity.report.diffs); a statistical case's figure is its band
(parity.report.bands). Written as `<case>/<case>.png` and `.svg`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from parity.core.paths import inside
from parity.report.bands import build_band_figure
from parity.report.canvas import FIGSIZE, envelope, marked, finish_figure, new_figure, save_figure, stride
from parity.report.diffs import plot_diffs
from parity.report.model import LABEL, CaseRun, baseline_origin, load_case_run, metric_series

MARKERS = "osD^vPX*"
LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int, k: int, n_steps: int) -> dict:
    """Setup i of k: its own colour, marker, dash and a smaller marker than the one before.

    In a bitwise case every curve lies on the reference. Drawing later setups with thinner
    dashes and smaller markers on top leaves each earlier one visible as a rim around it, and
    staggering which steps carry markers keeps long runs readable. Curves longer than
    MARKED_STEPS have no markers: the dashes and widths alone keep them apart.
    """
    every = stride(n_steps)
    marks = {
        "marker": MARKERS[i % len(MARKERS)],
        "markersize": max(4.0, 10.0 - 6.0 * i / max(1, k - 1)) if k > 1 else 7.0,
        "markeredgecolor": "white",  # a light rim separates a marker from the larger one beneath it
        "markeredgewidth": 0.7,
        "markevery": (round(i * every / max(1, k)) % every, every),
    }
    return {
        "color": f"C{i % 10}",
        **(marks if marked(n_steps) else {"marker": "none"}),
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "linewidth": max(0.8, 2.6 - 0.6 * i),
        "zorder": 3 + i,
    }


def _plot_baseline(ax, case: CaseRun, setup: str, metric: str, style: dict, n_steps: int) -> None:
    """The setup's stored baseline, where the case has one: hollow, larger and dotted, beneath the run."""
    entry, columns = case.baselines[setup]
    x, y = metric_series(columns, metric)
    if not len(x):
        return
    # Hollow, larger and dotted, so the run drawn over it stays visible inside it.
    marks = ({"marker": style["marker"], "markersize": style["markersize"] + 4, "markerfacecolor": "none",
              "markeredgewidth": 1.2, "markevery": style["markevery"]} if marked(n_steps) else {})
    label = f"{setup} baseline {baseline_origin(entry)}"
    ax.plot(*envelope(x, y), color=style["color"], **marks, linestyle=":", linewidth=1.0, zorder=2,
            alpha=0.9, label=label)


def _plot_values(ax, case: CaseRun, metric: str, n_steps: int) -> None:
    """Panel (a) or (b): every setup's values of one metric, each over its baseline."""
    k = len(case.setups)
    for i, s in enumerate(case.setups):
        style = _style(i, k, n_steps)
        if s.name in case.baselines:
            _plot_baseline(ax, case, s.name, metric, style, n_steps)
        x, y = metric_series(s.metrics, metric)
        if len(x):
            ax.plot(*envelope(x, y), label=s.name, **style)
    ax.set_ylabel(LABEL[metric])
    ax.grid(True, alpha=0.3)
    # A setup that blows up flattens every other curve onto zero on a linear axis.
    ys = np.concatenate([np.asarray(ln.get_ydata(), dtype=np.float64) for ln in ax.get_lines()] or [np.empty(0)])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if ys.size and ys.max() / ys.min() > 1e3:
        ax.set_yscale("log")


def build_figure(run_dir, case_name: str, case: CaseRun | None = None):
    """The case's figure: axes[0] loss, axes[1] grad norm, axes[2] |difference| to the reference; a statistical
    case's band figure instead. `case`: the case's records (load_case_run), where the caller has read them."""
    case = case or load_case_run(run_dir, case_name)
    if case.verdict is not None and case.verdict.statistical:
        return build_band_figure(case)
    n_steps = max((s.steps for s in case.setups), default=0)
    fig = new_figure(FIGSIZE)
    axes = fig.subplots(3, 1, sharex=True, height_ratios=(1, 1, 1.25))
    _plot_values(axes[0], case, "loss", n_steps)
    _plot_values(axes[1], case, "grad_norm", n_steps)
    if case.setups:
        plot_diffs(axes[2], case)
    axes[0].legend(fontsize=7.5, ncol=2, loc="best", framealpha=0.85)
    axes[2].set_xlabel("step")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].tick_params(labelbottom=True)
    bitwise = case.mode == "bitwise"
    titles = ("(a) loss", "(b) grad norm (pre-clip)",
              "(c) |difference| to the reference" + (": bitwise mode, any difference fails" if bitwise else ""))
    return finish_figure(fig, axes, titles, f"{case.name}: {' vs '.join(s.name for s in case.setups)}\n"
                         f"platform {case.platform} · {case.words()}", 10.5, case.passed)


def plot_case(run_dir, case_name: str, case: CaseRun | None = None) -> tuple[Path, Path]:
    """Writes `<run_dir>/<case>/<case>.png` and `.svg`; returns their paths."""
    return save_figure(build_figure(run_dir, case_name, case), inside(run_dir, case_name, case_name))
