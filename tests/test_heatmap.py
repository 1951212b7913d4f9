"""The probes heatmap a reader can use: no figure where every probe is bitwise equal, and around the first
divergence a figure of bounded height whose boxed entry is in the first screen (no torch, no run directory
written by a trainer: probes rows built in memory)."""

from __future__ import annotations

import matplotlib.image as mpimg
from matplotlib.patches import Rectangle

from parity.report import heatmap, probe_rows
from parity.report.canvas import DPI
from parity.report.model import CaseRun, SetupRun

STEPS = (1, 2, 3)
PHASES = ("forward", "backward", "update")
N_ROWS, DIVERGES = 300, 200  # rows 0-99 forward, 100-199 backward, 200-299 update
MAX_HEIGHT_PX = 900


def rows_of_probes(change=None) -> list[dict]:
    """N_ROWS probes per step in causal order; `change(step, row, value)` edits a value."""
    rows = []
    for step in STEPS:
        for k in range(N_ROWS):
            value = 1.0 + k / 7 + step / 3
            rows.append({"step": step, "phase": PHASES[k // 100], "name": f"layers.{k}.feed_forward.w1.weight",
                         "stat": "sumsq", "value": change(step, k, value) if change else value})
    return rows


def case_of(tmp_path, other_probes: list[dict]) -> CaseRun:
    """A case of two setups, without a verdict (localized bitwise), as the report would read it."""
    setups = [SetupRun("ref", {}, {}, rows_of_probes()), SetupRun("other", {}, {}, other_probes)]
    return CaseRun("late", tmp_path / "late", None, setups)


def from_row_200_at_step_2(step, k, value):
    return value * (1 + 1e-3) if step >= 2 and k >= DIVERGES else value


def test_bitwise_equal_probes_draw_no_heatmap_but_say_so_in_one_sentence(tmp_path):
    case = case_of(tmp_path, rows_of_probes())
    view = heatmap.plot_probes(tmp_path, "late", case)
    assert view == heatmap.ProbesView(sentence="all 300 probes bitwise equal over probed steps 1–3 (other against "
                                               "ref: 900 entries); no heatmap drawn")
    assert heatmap.build_probes_figure(tmp_path, "late", case) is None
    assert not (tmp_path / "late").exists()  # nothing written, nothing for a page to link to


def test_a_late_divergence_is_drawn_around_it_within_one_screen(tmp_path):
    case = case_of(tmp_path, rows_of_probes(from_row_200_at_step_2))
    view = heatmap.plot_probes(tmp_path, "late", case)
    height, width = mpimg.imread(view.png).shape[:2]
    assert height <= MAX_HEIGHT_PX, height
    full_height = mpimg.imread(view.full_png).shape[0]  # every row, kept beside it, not in the page
    assert view.full_png == tmp_path / "late" / "late-probes-full.png" and full_height > 2 * height
    fig = heatmap.build_probes_figure(tmp_path, "late", case)
    assert round(fig.get_figheight() * DPI) == height
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # From ROWS_BEFORE above the first diverging row, ROWS_SHOWN rows, each named by phase and parameter.
    assert labels[0] == "backward  layers.195.feed_forward.w1.weight" and len(labels) == probe_rows.ROWS_SHOWN
    assert labels[5] == "update  layers.200.feed_forward.w1.weight"
    assert all(t.get_fontsize() >= 8 for t in ax.get_yticklabels())
    box = next(p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] != (0, 0, 0))
    assert box.get_xy() == (1 - 0.5, 5 - 0.5)  # step 2, the row of layers.200: boxed and in view
    texts = [t.get_text() for t in ax.texts + fig.texts]
    below = N_ROWS - 195 - probe_rows.ROWS_SHOWN
    assert "↑ 195 rows above left out" in texts and f"↓ {below} rows below left out" in texts
    assert any(t.startswith("rows 196–217 of 300") and "late-probes-full.png" in t for t in texts)
    whole = heatmap.build_probes_figure(tmp_path, "late", case, whole=True)
    assert len(whole.axes[0].get_yticklabels()) == N_ROWS


def test_panels_share_the_window_of_the_earliest_divergence(tmp_path):
    def from_row_280(step, k, value):
        return value * 2 if k >= 280 else value

    case = case_of(tmp_path, rows_of_probes(from_row_200_at_step_2))
    case.setups.append(SetupRun("later", {}, {}, rows_of_probes(from_row_280)))
    fig = heatmap.build_probes_figure(tmp_path, "late", case)
    first, later = fig.axes[:2]
    assert first.get_yticklabels()[0].get_text() == "backward  layers.195.feed_forward.w1.weight"
    assert "layers.280" in later.get_title(loc="left") and "below the rows shown" in later.get_title(loc="left")
    assert "below the rows shown" not in first.get_title(loc="left")


def test_the_window_follows_causal_order_step_first(tmp_path):
    """Without a first divergence (the probes agree within tolerance) the window sits at the first entry in causal
    order that is not bitwise equal: step 2 row 150 comes before step 3 row 10."""
    def two_entries(step, k, value):
        return value * (1 + 1e-12) if (step, k) in ((2, 150), (3, 10)) else value

    case = case_of(tmp_path, rows_of_probes(two_entries))
    panels = [(s, m, None, line) for s, m, _, line in heatmap._probe_panels(case)]
    assert probe_rows.window(panels) == range(145, 145 + probe_rows.ROWS_SHOWN)
    # At the bottom the window keeps its size; a matrix that fits is drawn whole.
    m = panels[0][1]
    m["exact"][:] = True
    m["exact"][-1, 0] = False
    assert probe_rows.window(panels) == range(N_ROWS - probe_rows.ROWS_SHOWN, N_ROWS)
    small = [(s, probe_rows.rows_of(m, range(10)), None, line) for s, m, _, line in panels]
    assert probe_rows.window(small) == range(10)


def test_steps_text():
    assert probe_rows.steps_text([1, 2, 3, 4]) == "1–4"
    assert probe_rows.steps_text([1, 5, 10]) == "1, 5, 10"
    assert probe_rows.steps_text(list(range(1, 100, 7))) == "1, 8, …, 99 (15 steps)"
