"""Which rows of the probes heatmap a reader is shown: those around the first divergence, a bounded number of them,
or none at all where every entry is bitwise equal (one sentence says so instead).

A case with a debug model has some 170 probe rows; drawn whole at a readable size the first divergence sits
screens below the top. The window starts a few rows above it, in causal order within a step (what still agreed
just before it), and runs on a bounded number of rows after it (where the difference spread). Every probed step
stays a column. The panels share their rows, so one window serves them all, anchored at the topmost row among
their first divergences; a panel whose own lies below it says so in its title.
"""

from __future__ import annotations

import numpy as np

ROWS_SHOWN = 22  # at 0.16 in a row, with titles and legend, the figure stays under 900 px at 150 dpi
ROWS_BEFORE = 5  # rows above the first divergence: the entries just before it, which still agreed


def count(panels: list) -> int:
    """The rows of the panels' matrices (they share the reference's rows; a setup may add its own)."""
    return max(len(m["rows"]) for _, m, _, _ in panels)


def all_exact(panels: list) -> bool:
    """Whether every entry of every panel's matrix is bitwise equal (none missing, none differing)."""
    return all(m["exact"].all() for _, m, _, _ in panels)


def anchor(m: dict, first: dict | None) -> int | None:
    """The row of the boxed first divergence; where there is none (the probes agree, within tolerance), the row of
    the first entry in causal order (step, then row) that is not bitwise equal; None where every entry is."""
    if first is not None:
        key = (first["phase"], first["name"], first["stat"])
        if key in m["rows"]:
            return m["rows"].index(key)
    by_step = np.flatnonzero(~m["exact"].T)  # step-major: causal order
    return int(by_step[0] % len(m["rows"])) if by_step.size else None


def window(panels: list) -> range:
    """The rows shown: ROWS_SHOWN of them from ROWS_BEFORE above the earliest anchor (fewer above it at the top,
    more above it at the bottom), or every row where there are no more than that."""
    n_rows = count(panels)
    anchors = [a for _, m, first, _ in panels if (a := anchor(m, first)) is not None]
    if n_rows <= ROWS_SHOWN or not anchors:
        return range(n_rows)
    start = min(max(0, min(anchors) - ROWS_BEFORE), n_rows - ROWS_SHOWN)
    return range(start, start + ROWS_SHOWN)


def rows_of(m: dict, rows: range) -> dict:
    """A matrix (localize.matrix) cut to the given rows, every step kept."""
    cut = slice(rows.start, rows.stop)
    return {**m, "rows": m["rows"][cut], "rel": m["rel"][cut], "exact": m["exact"][cut], "agree": m["agree"][cut]}


def left_out(rows: range, n_rows: int) -> tuple[int, int]:
    """How many rows a window leaves out above and below it."""
    return rows.start, n_rows - min(rows.stop, n_rows)


def steps_text(steps: list[int]) -> str:
    """'1–10' for consecutive steps, else the steps themselves (the first two and the last of a long list)."""
    if len(steps) > 1 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}–{steps[-1]}"
    if len(steps) > 6:
        return f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} steps)"
    return ", ".join(map(str, steps))


def agreement_sentence(reference: str, panels: list) -> str:
    """What the report says in place of a heatmap whose every entry is bitwise equal."""
    n_rows = count(panels)
    steps = panels[0][1]["steps"]
    others = " and ".join(s.name for s, _, _, _ in panels)
    each = " each" if len(panels) > 1 else ""
    return (f"all {n_rows} probes bitwise equal over probed steps {steps_text(steps)} "
            f"({others} against {reference}: {n_rows * len(steps)} entries{each}); no heatmap drawn")
