"""The probes heatmap of a case: where in the model, step by step, each setup first parts from the reference.

|relative difference| of every probe to the reference: rows in causal order within a step, grouped by phase,
probed steps as columns, one panel per non-reference setup. Written as `<case>/<case>-probes.png` and `.svg`
where the setups recorded probes.csv.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from parity.case.schema import Tolerance
from parity.core import records
from parity.core.paths import inside
from parity.report.canvas import new_figure, save_figure, title_colour
from parity.report.model import CaseRun, SetupRun, load_case_run
from parity.verdict import localize

EXACT_COLOUR, MISSING_COLOUR, FIRST_COLOUR = "white", "0.72", "crimson"
# The layout in inches: the names on the left, the phases and the colour bar on the right.
LEFT, RIGHT, TOP, BOTTOM, GAP = 2.3, 1.7, 1.3, 0.9, 0.15


def _probe_panels(case: CaseRun) -> list[tuple[SetupRun, dict, dict | None, str]]:
    """(setup, matrix, first divergence, line) per non-reference setup that has probes to compare."""
    ref = case.setups[0] if case.setups else None
    if ref is None or ref.probes is None:
        return []
    panels = []
    for s in case.setups[1:]:
        if s.probes is None:
            continue
        # The verdict's localization is the judged one (its mode and tolerances); an unjudged run is localized bitwise.
        pair = case.pair(s.name)
        loc = (pair.localization if pair is not None and pair.localization
               else localize.localize(ref.probes, s.probes, "bitwise", {}, (ref.name, s.name)))
        tolerances = _probe_tolerances(case) if loc.mode == "tolerance" else None
        m = localize.matrix(ref.probes, s.probes, "tolerance" if tolerances else "bitwise", tolerances)
        m["tolerance"] = tolerances is not None
        panels.append((s, m, loc.first, loc.line))
    return panels


def _probe_tolerances(case: CaseRun) -> dict | None:
    """The verdict's probe tolerance per phase; None when it has not all of them (a verdict from before probes)."""
    bounds = {p: case.tolerance(p) for p in records.PROBE_PHASES}
    if any(b is None for b in bounds.values()):
        return None
    return {p: Tolerance(*b) for p, b in bounds.items()}


def _colour_scale(panels: list) -> LogNorm | None:
    """One log scale over every panel's differing entries, so their colours compare; None when all are exact."""
    positive = np.concatenate([m["rel"][(m["rel"] > 0) & ~m["exact"]].ravel() for _, m, _, _ in panels])
    positive = positive[np.isfinite(positive)]
    if not positive.size:
        return None
    lo, hi = float(positive.min()), float(positive.max())
    return LogNorm(lo if hi > lo else lo / 10, hi if hi > lo else hi * 10)


def _legend(fig, panels: list) -> None:
    legend = [Patch(facecolor=EXACT_COLOUR, edgecolor="0.5", label="exact (bitwise equal)"),
              Patch(facecolor=MISSING_COLOUR, edgecolor="0.5", label="missing / not finite"),
              Patch(facecolor="none", edgecolor=FIRST_COLOUR, linewidth=2, label="first divergence")]
    if any(m["tolerance"] for _, m, _, _ in panels):
        legend.append(Line2D([], [], linestyle="none", marker="o", markersize=3, color="black",
                             label="beyond tolerance"))
    fig.legend(handles=legend, loc="lower left", ncol=len(legend), fontsize=7.5, frameon=False)


def build_probes_figure(run_dir, case_name: str, case: CaseRun | None = None):
    """The heatmap figure, one panel per non-reference setup; None when there are no probes. `case`: the case's
    records (load_case_run), where the caller has read them already."""
    case = case or load_case_run(run_dir, case_name)
    panels = _probe_panels(case)
    if not panels:
        return None
    n_rows = max(len(m["rows"]) for _, m, _, _ in panels)
    n_cols = max(len(m["steps"]) for _, m, _, _ in panels)
    panel, height = min(8.0, max(2.4, 0.3 * n_cols + 0.6)), max(2.0, 0.11 * n_rows)  # 71 probed steps stay 8 in
    width = LEFT + RIGHT + len(panels) * panel + (len(panels) - 1) * GAP
    fig = new_figure((width, TOP + height + BOTTOM))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)
    fig_height = fig.get_figheight()
    fig.subplots_adjust(left=LEFT / width, right=1 - RIGHT / width, top=1 - TOP / fig_height,
                        bottom=BOTTOM / fig_height, wspace=GAP / panel)
    norm = _colour_scale(panels)
    image = None
    for ax, (s, m, first, line) in zip(axes[0], panels):
        image = _probe_panel(ax, m, first, norm) or image
        ax.set_title(f"{s.name} vs {case.setups[0].name}\n" + "\n".join(textwrap.wrap(line, int(panel * 15)) or [""]),
                     fontsize=7.5, loc="left")
    _phase_labels(axes[0][-1], panels[-1][1]["rows"])
    if image is not None:
        bar = fig.colorbar(image, cax=fig.add_axes([1 - (RIGHT - 0.55) / width, BOTTOM / fig_height,
                                                    0.15 / width, height / fig_height]))
        bar.set_label("|other − reference| / |reference|", fontsize=8)
    else:
        fig.text(0.5, 0.35 / fig_height, "every compared probe is bitwise equal", ha="center", fontsize=9,
                 color="darkgreen")
    _legend(fig, panels)
    fig.suptitle(f"{case.name}: probes in causal order · {case.words()}", fontsize=10,
                 color=title_colour(case.passed))
    return fig


def _label_rows_and_steps(ax, rows: list[tuple], steps: list) -> None:
    """Phase separators, a name per row and at most 24 step labels."""
    phases = [r[0] for r in rows]
    for i in range(1, len(rows)):
        if phases[i] != phases[i - 1]:
            ax.axhline(i - 0.5, color="black", linewidth=1.2)
    ax.set_yticks(range(len(rows)), [name if stat == "sumsq" else f"{name} ({stat})" for _, name, stat in rows],
                  fontsize=5 if len(rows) > 40 else 7)
    shown = range(0, len(steps), math.ceil(len(steps) / 24))  # at most 24 step labels: they stay readable
    ax.set_xticks(shown, [str(steps[j]) for j in shown], fontsize=7)
    ax.set_xlabel("probed step", fontsize=8)


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
    _label_rows_and_steps(ax, rows, steps)
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


def plot_probes(run_dir, case_name: str, case: CaseRun | None = None) -> tuple[Path, Path] | None:
    """Writes `<run_dir>/<case>/<case>-probes.png` and `.svg` when the setups recorded probes; None otherwise."""
    fig = build_probes_figure(run_dir, case_name, case)
    if fig is None:
        return None
    return save_figure(fig, inside(run_dir, case_name, f"{case_name}-probes"))
