"""PR evidence: a markdown block for a pull request, over a run directory; reads the records, never writes them
(except the png format, which draws a case's figure where it is missing, as `parity report` would).

Two formats. `mermaid` (the default) renders on GitHub as pasted: the summary table, per case its verdict,
the first divergence of each pair, each baseline's triage (drift or changed), the loss and grad-norm curves
as Mermaid `xychart-beta` charts, the provenance and the commands that reproduce it. `png` links the case
figure (`<case>/<case>.png`) instead of drawing charts: for a report uploaded with its images, as an artifact.

Only the plain subset of xychart-beta is used (Mermaid 10.6 and later, which GitHub renders): a title, a
numeric x-axis range (or the steps, for a short run), a y-axis range and `line [...]` rows, with the
colours set by an init directive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.report import markdown
from parity.report.curves import plot_case
from parity.report.model import LABEL, PLOTTED, CaseRun, baseline_origin, by_step, find_case_runs, load_case_run, number
from parity.report.tables import SUMMARY_COLUMNS, md_table, provenance, summary_row, triage_text
from parity.verdict.formatting import band_text, headline_text, values_text

FORMATS = ("mermaid", "png")
# At most this many points per line: the first step, the last, and a low and a high per bucket between them.
# Enough for the shape of a curve in a chart about 700 px wide, and small enough that a case's charts stay a
# few KB (a GitHub comment holds 65536 characters).
POINTS = 150
BUCKETS = (POINTS - 2) // 2
# matplotlib's tab10, the colours of the report's figures, so a setup has one colour everywhere. Named in the
# text under each chart: an xychart has no legend.
PALETTE = (("blue", "#1f77b4"), ("orange", "#ff7f0e"), ("green", "#2ca02c"), ("red", "#d62728"),
           ("purple", "#9467bd"), ("brown", "#8c564b"), ("pink", "#e377c2"), ("grey", "#7f7f7f"),
           ("olive", "#bcbd22"), ("cyan", "#17becf"))
SIGNIFICANT = 6  # digits of a value in a chart
# Up to this many steps the x-axis names each step; a numeric range over 4 steps would tick at 1.2, 1.4, ...
LABELLED_STEPS = 20


@dataclass
class Line:
    name: str  # as the text under the chart names it, e.g. "`tp`" or "`tp` baseline (cpu-gloo, ok)"
    steps: np.ndarray  # increasing, each once
    values: np.ndarray  # float64, the recorded values (NaN and inf included)


# ----------------------------------------------------------------------------- first divergence


def divergence_lines(case: CaseRun) -> list[str]:
    """Per pair, its headline (parity.verdict.headline): the first divergence in causal order, probes first where
    they were recorded, and for a control the effect it declares; then, where the headline is not at that entry,
    the entry itself with both values. A verdict written before headlines gives its metric lanes' divergence."""
    out = []
    for p in case.pairs:
        who = f"{markdown.code(p.other)} vs {markdown.code(p.reference)}"
        told = headline_text(p)
        if not told:
            out.append(f"{who}: no divergence" + (" (metrics and weights agree)" if p.passed else ""))
            continue
        line = f"{who}: **{markdown.text(told)}**"
        e = p.headline.entry if p.headline else p.diverged
        if e:
            # write_json stores NaN and inf as strings; entry_text and band_text format numbers.
            e = {**e, **{k: number(e.get(k)) for k in ("value_ref", "value_other", "abs", "rel", "z", "limit") if k in e}}
            line += f"; {markdown.text(band_text(e) if 'window' in e else values_text(e))}"
        out.append(line)
    return out


# ----------------------------------------------------------------------------- charts


def chart_lines(case: CaseRun, metric: str) -> tuple[list[Line], list[str]]:
    """The lines of one metric's chart, each setup after its stored baseline (as plot_case draws them, the
    baseline beneath), and a note for each setup that has nothing to draw."""
    lines, notes = [], []
    for s in case.setups:
        if s.name in case.baselines:
            check, columns = case.baselines[s.name]
            if metric in columns:
                origin = markdown.text(baseline_origin(check))
                lines.append(Line(f"`{s.name}` baseline {origin}", *by_step(columns, metric)))
        if not s.steps:
            notes.append(f"`{s.name}` recorded no metrics (status {markdown.text(s.run.get('status', 'unknown'))}): "
                         "no line.")
        elif metric not in s.metrics:
            notes.append(f"`{s.name}` recorded no {LABEL[metric]}: no line.")
        else:
            lines.append(Line(f"`{s.name}`", *by_step(s.metrics, metric)))
    return lines, notes


def shared_grid(lines: list[Line]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every step any line has, and per line its values on them (rows) and whether it recorded each."""
    grid = np.unique(np.concatenate([ln.steps for ln in lines]))
    values = np.full((len(lines), len(grid)), np.nan)
    recorded = np.zeros((len(lines), len(grid)), dtype=bool)
    for row, ln in enumerate(lines):
        at = np.searchsorted(grid, ln.steps)
        values[row, at], recorded[row, at] = ln.values, True
    return grid, values, recorded


def decimate(values: np.ndarray) -> np.ndarray:
    """Per line (row), the columns to draw: all of them up to POINTS; beyond, the first, the last, and for each
    of BUCKETS equal runs of steps between them its lowest and its highest finite value, in step order.

    Min/max per bucket rather than a fixed stride: a loss spike or a grad-norm blow-up between two strided
    steps would vanish from the picture, and a spike is what a reader of a parity chart looks for. The two
    points of a bucket sit half a bucket apart on the axis although they may be closer: at 1/74 of the
    width, too little to see. Every line gets the same count, so the columns of all lines line up on the
    one x-axis (Mermaid spreads a line's points evenly over it)."""
    n_lines, n = values.shape
    if n <= POINTS:
        return np.tile(np.arange(n), (n_lines, 1))
    bounds = np.linspace(1, n - 1, BUCKETS + 1).astype(np.int64)  # the interior, 1 .. n-2, in BUCKETS runs
    finite = np.isfinite(values)
    picked = np.empty((n_lines, POINTS), dtype=np.int64)
    picked[:, 0], picked[:, -1] = 0, n - 1
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        low = lo + np.where(finite[:, lo:hi], values[:, lo:hi], np.inf).argmin(axis=1)
        high = lo + np.where(finite[:, lo:hi], values[:, lo:hi], -np.inf).argmax(axis=1)
        # A bucket with nothing finite yields its first column twice (not finite, held below).
        picked[:, 1 + 2 * b], picked[:, 2 + 2 * b] = np.minimum(low, high), np.maximum(low, high)
    return picked


def _held(values: np.ndarray) -> np.ndarray:
    """Non-finite values replaced by the last finite one before them (the first finite one at the start):
    Mermaid draws numbers only, and a line must keep its length to stay on the shared x-axis."""
    finite = np.isfinite(values)
    last = np.maximum.accumulate(np.where(finite, np.arange(len(values)), -1))
    last[last < 0] = np.flatnonzero(finite)[0]
    return values[last]


def _number(value: float) -> str:
    # The chart is a picture: six significant digits are more than a pixel can show. (The records keep every
    # float exactly; this is the only place values are rounded, and only for drawing.) Positional, since
    # Mermaid's grammar has no exponent: 1e-07 would not parse.
    return np.format_float_positional(value, precision=SIGNIFICANT, unique=False, fractional=False, trim="-")


def _gaps(ln_name: str, metric: str, grid: np.ndarray, values: np.ndarray, recorded: np.ndarray) -> list[str]:
    """What a line cannot show, said in words: its NaN and inf values and the steps it has no value for."""
    out = []
    for what, where in (("**NaN**", recorded & np.isnan(values)), ("**inf**", recorded & np.isinf(values)),
                        ("no value", ~recorded)):
        if where.any():
            out.append(f"{ln_name} {LABEL[metric]} is {what} at {int(where.sum())} of {len(grid)} steps "
                       f"(first: step {int(grid[np.argmax(where)])})")
    return out


def mermaid_chart(case: CaseRun, metric: str) -> list[str]:
    """One metric's chart for the case: a fenced mermaid block and the text under it (the legend, the
    decimation, what could not be drawn); only the text when no setup has anything to draw."""
    lines, notes = chart_lines(case, metric)
    title = f"{case.name}: {LABEL[metric]}"
    if not lines:
        return [f"_{title}: nothing to draw._ " + " ".join(notes), ""]
    grid, values, recorded = shared_grid(lines)
    gaps = [g for row, ln in enumerate(lines) for g in _gaps(ln.name, metric, grid, values[row], recorded[row])]
    drawn = [row for row in range(len(lines)) if np.isfinite(values[row]).any()]
    notes += [f"{lines[row].name} has no finite {LABEL[metric]}: no line." for row in range(len(lines))
              if row not in drawn]
    if not drawn:
        return [f"_{title}: nothing finite to draw._ " + " ".join(gaps + notes), ""]
    columns = decimate(values[drawn])
    plotted = [_held(values[row])[cols] for row, cols in zip(drawn, columns)]
    low, high = float(min(p.min() for p in plotted)), float(max(p.max() for p in plotted))
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(drawn))]
    x_axis = (f'x-axis "step" [{", ".join(map(str, grid))}]' if len(grid) <= LABELLED_STEPS
              else f'x-axis "step" {grid[0]} --> {grid[-1]}')
    block = ["```mermaid",
             '%%{init: {"themeVariables": {"xyChart": {"plotColorPalette": "'
             + ", ".join(hex_ for _, hex_ in colours) + '"}}}}%%',
             "xychart-beta", f'    title "{title}"', f"    {x_axis}",
             f'    y-axis "{LABEL[metric]}" {_number(low - pad)} --> {_number(high + pad)}']
    block += ["    line [" + ", ".join(_number(v) for v in p) + "]" for p in plotted]
    block.append("```")
    legend = ", ".join(f"{lines[row].name} {name}" for row, (name, _) in zip(drawn, colours))
    text = [f"Lines, drawn in this order (a later line hides an equal earlier one): {legend}."]
    rows = values[drawn]
    if len(drawn) > 1 and all(np.array_equal(rows[0], r, equal_nan=True) for r in rows[1:]):
        text.append("Every line is equal to the first at every step: the last drawn covers the others.")
    if len(grid) > POINTS:
        text.append(f"{len(grid)} steps drawn as {POINTS} points per line: the first and last step and the lowest "
                    f"and highest value of each of {BUCKETS} equal runs of steps between them.")
    if gaps:
        text.append("; ".join(gaps) + ". Mermaid cannot draw these: the line holds its last finite value across "
                                      "them.")
    return block + ["", " ".join(text + notes), ""]


# ----------------------------------------------------------------------------- baselines


def baseline_lines(case: CaseRun) -> list[str]:
    """Per baseline check with a triage, what it says: a failed comparison, or the baseline an update mode
    rewrote after one (a reviewer of the PR that carries the new file wants to know which it was)."""
    return [f"Baseline {markdown.code(b.setup)} ({markdown.text(b.platform)}): {markdown.text(b.status)}, "
            f"{markdown.text(triage_text(b))}" for b in case.baseline_checks if b.triage]


# ----------------------------------------------------------------------------- the block


def evidence(run_dir, case: str | None = None, block_format: str = "mermaid") -> str:
    """A markdown block for a pull request: summary, first divergence, curves (`block_format` mermaid) or the figure
    (`block_format` png), the commands that reproduce each case, torch and hardware."""
    if block_format not in FORMATS:
        raise ValueError(f"format {block_format!r}: allowed {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    names = [case] if case else find_case_runs(run_dir)
    case_runs = [load_case_run(run_dir, n) for n in names if (run_dir / n).is_dir()]
    if not case_runs:
        return f"No cases found in {markdown.code(run_dir)}" + (f" named {markdown.code(case)}" if case else "") + ".\n"
    out = [md_table(SUMMARY_COLUMNS, [summary_row(case_run) for case_run in case_runs]), ""]
    for case_run in case_runs:
        out += [f"**{case_run.name}**: {markdown.text(case_run.words())}", ""]
        out += [line + "  " for line in divergence_lines(case_run)] + ([""] if case_run.verdict is not None else [])
        out += [line + "  " for line in baseline_lines(case_run)] + ([""] if baseline_lines(case_run) else [])
        if block_format == "mermaid":
            for metric in PLOTTED:
                out += mermaid_chart(case_run, metric)
        else:
            png = run_dir / case_run.name / f"{case_run.name}.png"
            if not png.is_file() and any(s.steps for s in case_run.setups):
                png = plot_case(run_dir, case_run.name, case_run)[0]
            if png.is_file():
                out += [f"![{case_run.name}]({png.as_posix()})", ""]
        out += provenance_lines(case_run, run_dir)
    return "\n".join(out)


def provenance_lines(case: CaseRun, run_dir) -> list[str]:
    """Where the case's numbers came from: the stack and the platform as the verdict names it, the code under
    test and the parity that judged it, then the commands that reproduce it from the repository root."""
    prov = provenance(case, run_dir)
    worlds = " / ".join(dict.fromkeys(str(s.run.get("world_size")) for s in case.setups if s.run.get("world_size")))
    titan = [f"{key} {markdown.code(prov[key])}" for key in ("torchtitan", "torchtitan commit") if key in prov]
    code = [f"commit under test {markdown.code(prov['commit under test'])}", *titan,
            f"parity {markdown.code(prov['parity'])}"]
    return [f"torch {markdown.code(prov['torch'])} · device {markdown.code(prov['device'])} · platform "
            f"{markdown.code(prov['platform'])} · backend {markdown.code(prov['backend'])} · world size "
            f"{markdown.text(worlds or '—')} · python {markdown.code(prov['python'])}  ", " · ".join(code), "",
            "Reproduce (from the repository root):", "", *markdown.fence(prov["command"], "sh"), ""]
