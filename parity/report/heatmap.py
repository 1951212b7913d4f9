"""The probes heatmap of a case: where in the model, step by step, each setup first parts from the reference.

|relative difference| of every probe to the reference: rows in causal order within a step, grouped by phase,
probed steps as columns, one panel per non-reference setup. Written as `<case>/<case>-probes.png` and `.svg`
where the setups recorded probes, showing the rows around the first divergence (parity.report.probe_rows); where
that leaves rows out, every row is drawn in `<case>/<case>-probes-full.png` and `.svg` too. Where every entry is
bitwise equal no heatmap is drawn: a white box says nothing one sentence cannot, and the report shows the sentence.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from parity.case.schema import Tolerance
from parity.core import records
from parity.core.paths import inside
from parity.report import probe_rows
from parity.report.canvas import new_figure, save_figure, title_colour
from parity.report.model import CaseRun, SetupRun, load_case_run
from parity.verdict import localize
from parity.verdict.model import BASIS

EXACT_COLOUR, MISSING_COLOUR, FIRST_COLOUR = "white", "0.72", "crimson"
# The layout in inches: the phases and the colour bar on the right, the titles above, the legend below.
RIGHT, TOP, BOTTOM, GAP = 1.7, 1.3, 0.9, 0.15
FULL_ROW, FULL_FONT = 0.11, 5  # every row: a map of the whole model, its names small
CROP_ROW, CROP_FONT = 0.16, 8  # the rows around the first divergence: names a reader reads without zooming


@dataclass(frozen=True)
class ProbesView:
    """What the report shows of a case's probes: the heatmap's files, or, where every entry is bitwise equal,
    one sentence instead of a figure."""
    png: Path | None = None
    svg: Path | None = None
    full_png: Path | None = None  # every row, where the heatmap shows only those around the first divergence
    sentence: str | None = None


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


def _boxed(panels: list) -> str:
    """What the box marks: the first entry beyond tolerance, or not bitwise equal, as the localization judged."""
    judged = {f"first {BASIS['tolerance' if m['tolerance'] else 'bitwise']}" for _, m, _, _ in panels}
    return " / ".join(sorted(judged))


def _legend(fig, panels: list) -> None:
    legend = [Patch(facecolor=EXACT_COLOUR, edgecolor="0.5", label="exact (bitwise equal)"),
              Patch(facecolor=MISSING_COLOUR, edgecolor="0.5", label="missing / not finite"),
              Patch(facecolor="none", edgecolor=FIRST_COLOUR, linewidth=2, label=_boxed(panels))]
    if any(m["tolerance"] for _, m, _, _ in panels):
        legend.append(Line2D([], [], linestyle="none", marker="o", markersize=3, color="black",
                             label="beyond tolerance"))
    fig.legend(handles=legend, loc="lower left", ncol=len(legend), fontsize=7.5, frameon=False)


def _row_label(row: tuple, with_phase: bool) -> str:
    phase, name, stat = row
    label = name if stat == "sumsq" else f"{name} ({stat})"
    return f"{phase}  {label}" if with_phase else label


def _left_margin(labels: list[str], font: float) -> float:
    """Inches the row names take, so the longest is not cut off (a character of DejaVu Sans is about 0.55 em wide)."""
    return 0.3 + max(map(len, labels), default=0) * font / 72 * 0.56


def build_probes_figure(run_dir, case_name: str, case: CaseRun | None = None, whole: bool = False):
    """The heatmap figure, one panel per non-reference setup: the rows around the first divergence, or every row
    (`whole`). None when there are no probes, or every entry is bitwise equal (plot_probes says so in a sentence).
    `case`: the case's records (load_case_run), where the caller has read them already."""
    case = case or load_case_run(run_dir, case_name)
    panels = _probe_panels(case)
    if not panels or probe_rows.all_exact(panels):
        return None
    return _draw(case, panels, range(probe_rows.count(panels)) if whole else probe_rows.window(panels))


def _draw(case: CaseRun, panels: list, window: range):
    """The figure of the rows in `window`: every row, or those around the first divergence."""
    n_rows = probe_rows.count(panels)
    cropped = len(window) < n_rows
    row, font = (CROP_ROW, CROP_FONT) if cropped else (FULL_ROW, FULL_FONT)
    shown = [(s, probe_rows.rows_of(m, window), first, line) for s, m, first, line in panels]
    labels = [_row_label(r, cropped) for r in max((m["rows"] for _, m, _, _ in shown), key=len)]
    left = max(2.3, _left_margin(labels, font))
    n_cols = max(len(m["steps"]) for _, m, _, _ in panels)
    panel, height = min(8.0, max(2.4, 0.3 * n_cols + 0.6)), max(2.0, row * len(window))  # 71 steps stay 8 in
    width = left + RIGHT + len(panels) * panel + (len(panels) - 1) * GAP
    fig = new_figure((width, TOP + height + BOTTOM))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)
    fig_height = fig.get_figheight()
    fig.subplots_adjust(left=left / width, right=1 - RIGHT / width, top=1 - TOP / fig_height,
                        bottom=BOTTOM / fig_height, wspace=GAP / panel)
    norm = _colour_scale(panels)  # over every row, so both views colour alike
    image = None
    for ax, (s, m, first, line) in zip(axes[0], shown):
        image = _probe_panel(ax, m, first, norm, labels, font) or image
        if first is not None and (first["phase"], first["name"], first["stat"]) not in m["rows"]:
            line += " (below the rows shown: see every row)"  # the window sits at another panel's, earlier one
        ax.set_title(f"{s.name} vs {case.setups[0].name}\n" + "\n".join(textwrap.wrap(line, int(panel * 15)) or [""]),
                     fontsize=7.5, loc="left")
    if cropped:
        _left_out_notes(fig, axes[0][0], window, n_rows, fig_height, case.name)
    else:
        _phase_labels(axes[0][-1], shown[-1][1]["rows"])
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


def _left_out_notes(fig, ax, window: range, n_rows: int, fig_height: float, case_name: str) -> None:
    """Say which rows the figure leaves out, above and below the rows it shows, and where every row is."""
    above, below = probe_rows.left_out(window, n_rows)
    if above:
        ax.text(-0.02, 1.0, f"↑ {above} rows above left out", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=8, style="italic")
    if below:
        ax.text(-0.02, 0.0, f"↓ {below} rows below left out", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, style="italic")
    fig.text(0.5, 1 - 0.42 / fig_height, f"rows {window.start + 1}–{window.stop} of {n_rows}, around the first "
             f"divergence; every row: {case_name}-probes-full.png", ha="center", va="top", fontsize=8)


def _label_rows_and_steps(ax, rows: list[tuple], steps: list, labels: list[str], font: float) -> None:
    """Phase separators, a name per row and at most 24 step labels."""
    phases = [r[0] for r in rows]
    for i in range(1, len(rows)):
        if phases[i] != phases[i - 1]:
            ax.axhline(i - 0.5, color="black", linewidth=1.2)
    ax.set_yticks(range(len(labels)), labels, fontsize=font)
    shown = range(0, len(steps), math.ceil(len(steps) / 24))  # at most 24 step labels: they stay readable
    ax.set_xticks(shown, [str(steps[j]) for j in shown], fontsize=7)
    ax.set_xlabel("probed step", fontsize=8)


def _probe_panel(ax, m: dict, first: dict | None, norm, labels: list[str], font: float):
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
    _label_rows_and_steps(ax, rows, steps, labels, font)
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


def plot_probes(run_dir, case_name: str, case: CaseRun | None = None) -> ProbesView | None:
    """Writes `<run_dir>/<case>/<case>-probes.png` and `.svg` (and, where they leave rows out, `-probes-full`)
    when the setups recorded probes that differ somewhere; the sentence alone when every entry is bitwise equal;
    None without probes."""
    case = case or load_case_run(run_dir, case_name)
    panels = _probe_panels(case)
    if not panels:
        return None
    if probe_rows.all_exact(panels):
        return ProbesView(sentence=probe_rows.agreement_sentence(case.setups[0].name, panels))
    n_rows = probe_rows.count(panels)
    window = probe_rows.window(panels)
    base = inside(run_dir, case_name, f"{case_name}-probes")
    png, svg = save_figure(_draw(case, panels, window), base)
    full = None
    if len(window) < n_rows:
        full, _ = save_figure(_draw(case, panels, range(n_rows)), base.with_name(f"{base.name}-full"))
    return ProbesView(png, svg, full)
