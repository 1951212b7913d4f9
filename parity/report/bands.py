"""The figure of a statistical case: the ensemble's band, every setup's window medians, and where one leaves it.

Drawn from the verdict alone (its `statistical` summary holds the members' window medians and the band,
each pair's test holds the setup's window medians and z), so it shows exactly what was judged:

    (a) the loss window medians: the members in grey, the setups in colour (the familiar loss curve);
    (b) loss and (c) grad norm (pre-clip, window medians) as differences from the ensemble's
        mean, relative: the band (mean +/- limit x floored sd x sqrt(1 + 1/K)) shaded, the members as
        thin grey lines, the setups in colour, a red ring and a label where a setup first leaves it
        (symlog: the band widens by decades as the runs drift, and a control may sit far outside);
    (d) |z| per window and setup against the limit: the test itself.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator

from parity.report.canvas import FIGSIZE, finish_figure, new_figure
from parity.report.model import LABEL, CaseRun
from parity.verdict.ensemble import METRICS
from parity.verdict.formatting import statistical_tests


def build_band_figure(case: CaseRun):
    """The four panels (a) to (d) of a statistical case, from its verdict's `statistical` summary and tests."""
    verdict = case.verdict
    st = verdict.statistical
    ends = np.asarray(st["window_ends"])
    tests = statistical_tests(verdict)
    colours = {name: f"C{(i + 1) % 10}" for i, name in enumerate(tests)}
    fig = new_figure((FIGSIZE[0], FIGSIZE[1] * 1.25))
    axes = fig.subplots(4, 1, sharex=True, height_ratios=(0.8, 1, 1, 0.8))
    if st["bands"]:
        _plot_curves(axes[0], st, tests, colours, ends)
        for ax, metric in zip(axes[1:3], METRICS):
            _plot_band(ax, st, metric, tests, colours, ends)
        _plot_z(axes[3], st, tests, colours, ends)
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no band: " + "; ".join(verdict.problems)[:160], ha="center", va="center",
                    transform=ax.transAxes, fontsize=7)
    axes[3].set_xlabel("last step of the window")
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    w = st["window"]
    floor = ", ".join(f"{n}/{len(ends)} {LABEL[m]}" for m, n in st["windows_at_floor"].items())
    titles = (f"(a) loss, median of each {w} steps: the members in grey",
              "(b) loss: difference from the ensemble's mean, relative; the band shaded",
              "(c) grad norm (pre-clip, median): the same",
              f"(d) |z| per window (solid loss, dashed grad norm): fails above {st['limit']:.3g}\n"
              f"    the tolerance, not the members' spread, set the band in {floor} windows")
    return finish_figure(fig, axes, titles, f"{case.name}: {case.words()}\n{st['k']} {st['perturb']}-perturbed "
                         f"members of {verdict.reference}, alpha {st['alpha']!r}", 9.5, verdict.passed)


def _plot_curves(ax, st: dict, tests: dict, colours: dict, ends: np.ndarray) -> None:
    for i, values in enumerate(st["bands"]["loss"]["members"].values()):
        ax.plot(ends, values, color="0.6", linewidth=2.5, zorder=1, label=f"{st['k']} members" if not i else None)
    for name, t in tests.items():
        if t.get("loss"):
            ax.plot(ends, t["loss"].values, color=colours[name], linewidth=1.0, zorder=3, label=name)
    ax.set_ylabel(LABEL["loss"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper right", framealpha=0.85)


def _relative(values, mean) -> np.ndarray:
    """(value - mean) / |mean|: a difference the same size at step 10 and at step 10^5 looks the same."""
    values, mean = np.asarray(values, dtype=np.float64), np.asarray(mean, dtype=np.float64)
    return (values - mean) / np.abs(mean)


def _plot_band(ax, st: dict, metric: str, tests: dict, colours: dict, ends: np.ndarray) -> None:
    band = st["bands"][metric]
    mean = band["mean"]
    low, high = _relative(band["low"], mean), _relative(band["high"], mean)
    ax.fill_between(ends, low, high, color="C0", alpha=0.2, linewidth=0, zorder=0,
                    label=f"band: |z| <= {st['limit']:.3g}")
    for i, values in enumerate(band["members"].values()):
        ax.plot(ends, _relative(values, mean), color="0.55", linewidth=0.6, zorder=1, label="members" if not i else None)
    for name, t in tests.items():
        test = t.get(metric)
        if not test:
            continue
        rel = _relative(test.values, mean)
        ax.plot(ends, rel, color=colours[name], linewidth=1.4, marker="o" if len(ends) <= 60 else None, markersize=3,
                zorder=3, label=name)
        first = test.first_failure
        if first:
            i = int(np.searchsorted(ends, first["step"]))
            ax.plot([first["step"]], [rel[i]], marker="o", markersize=13, markerfacecolor="none",
                    markeredgecolor="crimson", markeredgewidth=1.6, zorder=10)
            ax.annotate(f"{name} leaves the band:\nsteps {first['window'][0]}-{first['window'][1]}, "
                        f"z {first['z']:.3g}", (first["step"], rel[i]), xytext=(0.62, 0.92), textcoords="axes fraction",
                        va="top", fontsize=7.5, color="crimson",
                        bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="crimson", lw=0.6, alpha=0.9),
                        arrowprops=dict(arrowstyle="-", color="crimson", lw=0.8, shrinkB=7), zorder=11)
    # The band spans decades as the runs drift apart, and a control can sit far outside it: linear
    # within the narrowest half-width, logarithmic beyond.
    narrowest = float(np.nanmin(high)) if np.isfinite(high).any() and np.nanmin(high) > 0 else 1e-6
    ax.set_yscale("symlog", linthresh=narrowest, linscale=1.5)
    # Ticks inside the linear part crowd 0; its edges are the band's own edges, drawn already.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: "0" if y == 0 else "" if abs(y) <= narrowest * 1.01
                                               else f"{y:.0e}".replace("e-0", "e-").replace("e+0", "e")))
    ax.set_ylabel("(setup − mean) / mean")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="lower left", framealpha=0.85)


def _plot_z(ax, st: dict, tests: dict, colours: dict, ends: np.ndarray) -> None:
    lim = st["limit"]
    ax.axhspan(1e-3, lim, color="C0", alpha=0.2, linewidth=0, zorder=0)
    ax.axhline(lim, color="0.3", linewidth=1.0, zorder=1)
    top = lim
    for name, t in tests.items():
        for metric, style in zip(METRICS, ("-", "--")):
            test = t.get(metric)
            if test:
                z = np.abs(np.asarray(test.z, dtype=np.float64))
                ax.plot(ends, np.maximum(z, 1e-3), color=colours[name], linestyle=style, linewidth=1.2, zorder=3)
                top = max(top, float(np.nanmax(z)) if np.isfinite(z).any() else top)
    ax.set_yscale("log")
    ax.set_ylim(1e-3, top * 3)
    ax.set_ylabel("|z|")
    ax.grid(True, which="major", alpha=0.3)
    if not any(math.isfinite(x) for t in tests.values() for m in METRICS if t.get(m) for x in t[m].z):
        ax.text(0.5, 0.5, "no finite z", ha="center", va="center", transform=ax.transAxes)
