"""What every figure of the report shares: its size, resolution and title colour, a figure drawn without pyplot
(so drawing changes no global state of matplotlib), saving it as PNG and SVG, and thinning a long series to what
an axis can show.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from parity.core import records

DPI = 150
FIGSIZE = (7.2, 9.0)  # inches; at 150 dpi about 1080 px wide, the width of a PR comment
COLUMNS = 1000  # buckets a long curve is drawn in (envelope): about one per pixel column of an axis
MARKED_STEPS = 1000  # curves up to this many steps carry markers


def new_figure(figsize) -> Figure:
    """A figure on its own Agg canvas: no display needed, and nothing registered with pyplot."""
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def title_colour(passed: bool | None) -> str:
    """Green for a passed case, red for a failed one, black without a verdict."""
    return {True: "darkgreen", False: "firebrick"}.get(passed, "black")


def finish_figure(figure: Figure, axes, titles, suptitle: str, size: float, passed: bool | None) -> Figure:
    """Title each panel and the figure (coloured by the verdict), then lay it out."""
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9, loc="left")
    figure.suptitle(suptitle, fontsize=size, color=title_colour(passed))
    figure.tight_layout()
    return figure


def _save_atomic(figure: Figure, path: Path, file_format: str) -> None:
    with records.atomic_open(path, "wb") as f:
        figure.savefig(f, format=file_format, dpi=DPI)


def save_figure(figure: Figure, base: Path) -> tuple[Path, Path]:
    """`base`.png and .svg, each written atomically."""
    _save_atomic(figure, base.with_suffix(".png"), "png")
    _save_atomic(figure, base.with_suffix(".svg"), "svg")
    return base.with_suffix(".png"), base.with_suffix(".svg")


def stride(n_steps: int) -> int:
    """Steps between two markers of a curve."""
    # About 15 markers per curve: at 80 steps, a marker on every step merged into a thick band.
    return max(1, math.ceil(n_steps / 15))


def marked(n_steps: int) -> bool:
    """Whether curves of this length carry markers; longer ones are lines, told apart by colour and dash."""
    return n_steps <= MARKED_STEPS


def envelope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points of a long series worth drawing: per bucket of consecutive points (COLUMNS of them, about
    one per pixel column), its lowest, its highest and its first NaN, in step order: at most about
    3 x COLUMNS points, among them every spike at its height and a NaN where the line breaks. Series up to
    4 x COLUMNS points are drawn whole."""
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


def one_per_column(x: np.ndarray) -> np.ndarray:
    """Marker positions, at most one per pixel column (COLUMNS across the series' span, the first in each):
    markers that would be drawn over one another anyway. None of the columns that hold one goes empty."""
    if len(x) <= 4 * COLUMNS:
        return x
    column = (x - x.min()) * COLUMNS // max(1, x.max() - x.min() + 1)
    return x[np.flatnonzero(np.diff(column, prepend=-1))]
