"""Figures, report, regression report and progress, on run directories built by hand."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from parity.verdict.case_verdict import compare_case, write_verdict

from parity.core import records

import matplotlib.pyplot as plt

from parity.report import canvas, curves, pages, regression, tables
from parity.report.model import CaseRun, SetupRun
from parity.case.schema import Case, Expect, Setup, Tolerance, Train
from parity.run.progress import Progress

STEPS = 12


def _metrics(scale: float = 0.0, start: int = 4) -> list[dict]:
    """A plausible loss curve; `scale` > 0 adds a difference that starts at `start` and grows."""
    rows = []
    for s in range(1, STEPS + 1):
        drift = scale * 2.0 ** (s - start) if s >= start and scale else 0.0
        rows.append({"step": s, "loss": 10.0 * math.exp(-0.15 * s) + 0.5 + drift,
                     "grad_norm": 3.0 / s + 0.2 + drift * 3, "lr": 8e-4, "tokens": 2048 * s, "step_time_s": 0.1 * s})
    return rows


WEIGHTS = [{"param": f"layers.{i}.w", "norm": 1.0 + i / 7, "sha256": f"{i:064x}"} for i in range(3)]


def make_case(out: Path, case: str, setups: dict[str, list[dict]], mode="bitwise", verdict=True, command=True):
    """Run records written by hand, then judged by the comparison engine itself (never a hand-made verdict)."""
    names = list(setups)
    for name, rows in setups.items():
        d = records.setup_dir(out, case, name)
        records.write_metrics(d / "metrics.csv", rows)
        records.write_weights(d / "weights.csv", WEIGHTS)
        run = {"case": case, "setup": name, "status": "ok", "torch": "2.11.0+cpu", "python": "3.11.2",
               "device": "cpu", "platform": "cpu-gloo", "backend": "gloo", "world_size": 8,
               "mesh_shape": [2, 4], "mesh_dim_names": ["dp_replicate", "dp_shard"], "setup_config": {}, "train": {},
               "seed_checkpoint_sha256": "ab" * 32, "case_sha256": "cd" * 32, "case_path": f"cases/{case}.toml",
               "started": "2025-01-01T00:00:00", "ended": "2025-01-01T00:01:00", "git_commit": "deadbeef"}
        if command:
            run["command"] = ["parity", "run", f"cases/{case}.toml", "--out", "runs/x y"]
        records.write_json(d / "run.json", run)
    if verdict:
        tol = {m: Tolerance(1e-5, 1e-7) for m in ("loss", "grad_norm", "weights")}
        spec = Case(name=case, path=Path(f"cases/{case}.toml"), description="d", sha256="cd" * 32,
                    setups=tuple(Setup(name=n, train=Train()) for n in names),
                    expect=Expect(mode=mode, tolerance=tol, tolerance_source={m: "case" for m in tol}))
        write_verdict(out, compare_case(spec, out))


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    same = _metrics()
    make_case(out, "bitwise_fsdp", {"ddp": same, "fsdp": _metrics(), "hsdp": _metrics()})
    make_case(out, "tol_tp", {"ddp": same, "fsdp": _metrics(), "tp": _metrics(1e-6)}, mode="tolerance")
    make_case(out, "unjudged", {"ddp": same, "pp": _metrics()}, verdict=False, command=False)
    # The engine's judgement the tests below rely on: equal curves pass, the growing drift fails.
    assert records.read_json(out / "bitwise_fsdp" / "verdict.json")["passed"]
    assert not records.read_json(out / "tol_tp" / "verdict.json")["passed"]
    return out


def test_figure_has_three_panels_and_one_line_per_setup(run_dir):
    fig = curves.build_figure(run_dir, "tol_tp")
    try:
        assert len(fig.axes) == 3
        loss_lines = [ln.get_label() for ln in fig.axes[0].get_lines()]
        assert loss_lines == ["ddp", "fsdp", "tp"]
        assert fig.axes[2].get_yscale() == "log"
        assert "tol_tp" in fig._suptitle.get_text() and "FAIL" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_bitwise_case_still_draws_every_curve(run_dir):
    fig = curves.build_figure(run_dir, "bitwise_fsdp")
    try:
        for ax in fig.axes[:2]:
            lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            assert [ln.get_label() for ln in lines] == ["ddp", "fsdp", "hsdp"]
            assert all(len(ln.get_xdata()) == STEPS for ln in lines)
            # Coinciding curves must differ in marker and line style to be told apart.
            assert len({(ln.get_marker(), ln.get_linestyle()) for ln in lines}) == 3
        # Exact steps are drawn (in the floor band), not dropped from the log axis.
        assert sum(len(ln.get_xdata()) for ln in fig.axes[2].get_lines()) >= 2 * 2 * STEPS
    finally:
        plt.close(fig)


def test_plot_case_writes_png_and_svg(run_dir):
    png, svg = curves.plot_case(run_dir, "tol_tp")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.read_text().lstrip().startswith("<?xml")
    assert not list(png.parent.glob(".*.tmp"))


def test_report_names_every_case_and_leaves_data_alone(run_dir):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    md, page = pages.write_report(run_dir)
    text = md.read_text()
    for case in ("bitwise_fsdp", "tol_tp", "unjudged"):
        assert f"| {case} |" in text and case in page.read_text()
    assert "no verdict" in text
    assert "![tol_tp](tol_tp/tol_tp.png)" in text
    assert all(p.read_bytes() == b for p, b in before.items())


def test_report_html_is_self_contained(run_dir):
    _, page = pages.write_report(run_dir)
    doc = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", doc, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(https?:|//)""", doc, re.I)
    assert not re.search(r"<(script|link)\b", doc, re.I)
    imgs = re.findall(r"""<img\b[^>]*\bsrc="([^"]*)\"""", doc)
    assert len(imgs) == 3  # one figure per case with metrics
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_report_lists_exactly_the_planted_change(run_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    text, changed = regression.regression_report(old, run_dir)
    assert changed == [] and "0 changed · 3 unchanged" in text
    path = old / "tol_tp" / "fsdp" / "metrics.csv"
    rows = records.read_metrics(path)
    rows[6]["loss"] = math.nextafter(rows[6]["loss"], math.inf)  # one ulp on one step
    records.write_metrics(path, rows)
    text, changed = regression.regression_report(old, run_dir)
    assert changed == ["tol_tp"]
    assert "`fsdp` loss: 1/12 steps changed" in text and "first at step 7" in text
    assert "bitwise_fsdp" not in text and "2 unchanged" in text
    assert (old / "regression.md").read_text() == text


def test_regression_report_lists_verdict_changes_and_lone_cases(run_dir, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(run_dir, new)
    v = records.read_json(new / "bitwise_fsdp" / "verdict.json")
    v["passed"] = False
    records.write_json(new / "bitwise_fsdp" / "verdict.json", v)
    shutil.rmtree(new / "unjudged")
    make_case(new, "brand_new", {"a": _metrics(), "b": _metrics()})
    text, changed = regression.regression_report(new, run_dir)
    assert changed == ["bitwise_fsdp", "brand_new", "unjudged"]
    assert "PASS (bitwise, expect match) → FAIL" in text


def test_nonfinite_values_render(tmp_path):
    out = tmp_path / "run"
    bad = _metrics()
    bad[5]["loss"] = float("nan")
    bad[6]["grad_norm"] = float("inf")
    make_case(out, "blowup", {"ref": _metrics(), "bad": bad}, mode="tolerance")
    png, _ = curves.plot_case(out, "blowup")
    assert png.stat().st_size > 0
    md, _ = pages.write_report(out)
    assert "nan" in md.read_text()


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_silent_off_a_terminal():
    s = _Stream(False)
    p = Progress(s)
    p.update("case", "fsdp", 3, 10, 1.5)
    p.done()
    assert s.getvalue() == ""


def test_progress_rewrites_one_line_on_a_terminal():
    s = _Stream(True)
    p = Progress(s)
    p.update("case", "fsdp", 3, 10, 1.5)
    p.update("case", "ddp", 4, 10, 2.0)
    p.done()
    out = s.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n") and out.count("\n") == 1
    assert "case | ddp | step 4/10 | 2.0s" in out


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(run_dir, tmp_path):
    _, page = pages.write_report(run_dir)
    shot = tmp_path / "shot.png"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    url = page.resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The DOM chromium parsed holds every figure as a decodable PNG data URI.
    srcs = re.findall(r"""<img\b[^>]*\bsrc="([^"]*)\"""", dom.stdout)
    assert len(srcs) == 3
    for src in srcs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,3000", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- long runs: drawn as lines, downsampled, nothing that matters dropped ---------------------

LONG = 100_000
SPIKE, DIVERGES, NAN_AT = 30_001, 60_000, 90_000


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """Two setups of LONG steps: equal up to DIVERGES, then a relative 1e-9 apart; a spike in both, a NaN in one."""
    out = tmp_path_factory.mktemp("long") / "run"
    steps = np.arange(1, LONG + 1)
    loss = 2.0 + 8.0 * np.exp(-steps / 12_500)
    loss[SPIKE - 1] *= 40
    other = loss.copy()
    other[DIVERGES - 1:] *= 1 + 1e-9
    other[NAN_AT - 1] = math.nan

    def rows(values):
        return [{"step": s, "loss": x, "grad_norm": x / 10} for s, x in zip(steps.tolist(), values.tolist())]

    make_case(out, "long", {"ref": rows(loss), "other": rows(other)}, mode="tolerance")
    return out, loss


def test_a_long_run_is_drawn_as_bounded_lines_without_markers(long_run):
    out, loss = long_run
    fig = curves.build_figure(out, "long")
    try:
        for ax, scale in zip(fig.axes[:2], (1.0, 10.0)):
            lines = ax.get_lines()
            assert [ln.get_label() for ln in lines] == ["ref", "other"]
            for ln in lines:
                assert ln.get_marker() == "none"
                assert len(ln.get_xdata()) <= 3 * canvas.COLUMNS + 2
                # The spike survives the downsampling, at its height, and the NaN still breaks the line.
                assert np.nanmax(ln.get_ydata()) == loss[SPIKE - 1] / scale
            assert np.isnan(lines[1].get_ydata()[lines[1].get_xdata() == NAN_AT]).all()
        diffs = fig.axes[2].get_lines()
        assert all(len(ln.get_xdata()) <= 3 * canvas.COLUMNS + 2 for ln in diffs)
        # Ringed: the first step beyond tolerance (the NaN) in crimson; before it, the first step that is only
        # not bitwise (1e-9 relative, within tolerance) in grey; for loss and for grad norm.
        beyond = [ln for ln in diffs if ln.get_markeredgecolor() == "crimson"]
        assert [ln.get_xdata().tolist() for ln in beyond] == [[NAN_AT], [NAN_AT]]
        only_bits = [ln for ln in diffs if ln.get_markeredgecolor() == "0.45"]
        assert [ln.get_xdata().tolist() for ln in only_bits] == [[DIVERGES], [DIVERGES]]
        label = [t.get_text() for t in fig.axes[2].texts if t.get_text().startswith("other:")]
        assert label == [f"other:\nfirst beyond tolerance: loss, step {NAN_AT}\nfirst not bitwise: loss, step {DIVERGES}"]
        not_finite = [ln for ln in diffs if ln.get_label().endswith("not finite")]
        assert [ln.get_xdata().tolist() for ln in not_finite] == [[NAN_AT], [NAN_AT]]
        exact = [ln for ln in diffs if ln.get_marker() == "|"]
        assert exact and all(ln.get_xdata()[0] == 1 and ln.get_xdata()[-1] >= DIVERGES - 1 - LONG / canvas.COLUMNS
                             for ln in exact)
    finally:
        plt.close(fig)
    png, svg = curves.plot_case(out, "long")
    assert png.stat().st_size > 0 and svg.stat().st_size < 2_000_000  # 10^5 points would make it 20 MB


def test_a_long_runs_verdict_stays_small(long_run):
    out, _ = long_run
    verdict = out / "long" / "verdict.json"
    assert verdict.stat().st_size < 20_000
    pair = records.read_json(verdict)["pairs"][0]
    assert pair["metrics"]["loss"]["first_not_bitwise"]["step"] == DIVERGES
    assert pair["problems"][0] == f"loss: other has non-finite values at step {NAN_AT} (nan)"


def test_short_runs_keep_their_markers(run_dir):
    fig = curves.build_figure(run_dir, "tol_tp")
    try:
        assert [ln.get_marker() for ln in fig.axes[0].get_lines()] == ["o", "s", "D"]
    finally:
        plt.close(fig)


def test_peak_memory_per_setup():
    def run(**peak):
        return {"peak_memory": peak}

    assert tables.peak_memory(run(measure="host_rss", per_rank_bytes=[300 * 2**20, 412 * 2**20],
                                  max_bytes=412 * 2**20)) == "412 MiB (host RSS)"
    assert tables.peak_memory(run(measure="cuda_max_allocated", max_bytes=3 * 2**30)) == "3072 MiB (CUDA max allocated)"
    assert tables.peak_memory({}) == "—"  # an older run, or one made by another trainer or command
    assert tables.peak_memory(run(measure="host_rss", per_rank_bytes=["x"])) == "—"
    c = CaseRun("c", Path("."), None, [SetupRun("a", run(measure="host_rss", max_bytes=2**20), {}),
                                              SetupRun("b", {}, {})])
    assert [r["peak memory"] for r in tables.setup_rows(c)] == ["1 MiB (host RSS)", "—"]
    assert "| peak memory |" in tables.md_table(tables.SETUP_COLUMNS, tables.setup_rows(c))


def test_a_setup_trained_for_another_case_says_so():
    c = CaseRun("c", Path("."), None, [SetupRun("a", {"trained_as": "other/a_8"}, {}),
                                              SetupRun("b", {}, {})])
    assert [r["trained as"] for r in tables.setup_rows(c)] == ["other/a_8", "—"]
    assert "| trained as |" in tables.md_table(tables.SETUP_COLUMNS, tables.setup_rows(c))


def test_compare_and_report_import_no_torch(tmp_path):
    """Judging and drawing a copied run directory must not pay torch's start-up (seconds, hundreds of MB)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).parent.parent / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    run, case = scale.write_long_run(tmp_path, 2_000)
    check = "import sys; from parity.cli import main; rc = main(sys.argv[1:]); " \
            "print('torch' in sys.modules); sys.exit(rc)"
    compare_argv = ["compare", str(run), str(case), "--baselines", str(tmp_path / "b")]
    for argv, rc in ((compare_argv, 1), (["report", str(run)], 0)):
        done = subprocess.run([sys.executable, "-c", check, *argv], check=False, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == rc, done.stderr[-2000:]
        assert done.stdout.splitlines()[-1] == "False", argv


HOSTILE = {
    "tag": "<img src=x onerror=alert(1)>",
    "link": "[click](http://evil.example)",
    "heading": "fine\n# Owned heading",
    "leading": "# Owned from the start",
    "cell": "a | b | c",
    "fence": "```\n[pasted](http://evil.example)\n```",
}


def _plant_hostile_strings(run_dir: Path) -> None:
    """A run directory is input: what a copied or hand-made one says goes into Markdown and HTML."""
    path = run_dir / "tol_tp" / "verdict.json"
    v = records.read_json(path)
    v["problems"] = [HOSTILE["tag"], HOSTILE["link"], HOSTILE["heading"], HOSTILE["leading"]]
    v["mode"] = HOSTILE["cell"]
    v["pairs"][1]["problems"] = [HOSTILE["cell"] + HOSTILE["tag"]]
    v["pairs"][1]["diverged"]["metric"] = HOSTILE["link"]
    records.write_json(path, v)
    run = records.read_json(run_dir / "tol_tp" / "tp" / "run.json")
    run.update(command=["parity", "run", HOSTILE["fence"]], torch="`2.11` " + HOSTILE["link"])
    records.write_json(run_dir / "tol_tp" / "tp" / "run.json", run)
    evil = run_dir / "evil](http:x)"  # a folder no case could be named: not read as a case at all
    shutil.copytree(run_dir / "tol_tp", evil)


def _fences(text: str) -> list[tuple[str, list[str]]]:
    """Each fenced block as (its fence, its lines), parsed as CommonMark does: closed by a run of at least as many backticks."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^(`{3,})", lines[i])
        if not m:
            i += 1
            continue
        fence, body = m.group(1), []
        i += 1
        while i < len(lines) and not re.match(rf"^`{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append((fence, body))
        i += 1
    return blocks


def test_strings_from_a_run_directory_cannot_inject_markdown_or_html(run_dir):
    from parity.report import evidence

    _plant_hostile_strings(run_dir)
    md_path, html_path = pages.write_report(run_dir)
    for text in (md_path.read_text(), evidence.evidence(run_dir)):
        assert "evil" not in text.replace("evil.example", "")  # the odd folder is no case
        outside = text  # what Markdown renders as markup: the text less its code blocks and code spans
        for _, body in _fences(text):
            outside = outside.replace("\n".join(body), "")
        outside = re.sub(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", "", outside)
        assert "<img" not in outside
        assert "](http://evil.example)" not in outside.replace("\\](http://evil.example)", "")
        assert not any(line.lstrip("- ").startswith("#") and "Owned" in line for line in text.split("\n"))
        assert "a \\| b \\| c" in text and "| a | b |" not in text
        # The reproduce command holds a fence of its own: the block around it is longer, so it stays code.
        blocks = [(f, b) for f, b in _fences(text) if any("evil.example" in line for line in b)]
        assert blocks and all(len(f) > 3 for f, _ in blocks), blocks
    assert "&lt;img src=x onerror=alert(1)&gt;" in md_path.read_text()  # the problem is shown, as text
    page = html_path.read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "evil](" not in page
