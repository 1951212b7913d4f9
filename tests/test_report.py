"""Figures, report, regression report, PR evidence and progress, on run directories built by hand."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from parity import compare, records, report
from parity.spec import Case, Expect, Setup, Tolerance, Train
from parity.progress import Progress

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
               "mesh_shape": [2, 4], "mesh_dim_names": ["dp_replicate", "dp_shard"], "setup": {}, "train": {},
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
        compare.write_verdict(out, compare.compare_case(spec, out))


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
    fig = report.build_figure(run_dir, "tol_tp")
    try:
        assert len(fig.axes) == 3
        loss_lines = [ln.get_label() for ln in fig.axes[0].get_lines()]
        assert loss_lines == ["ddp", "fsdp", "tp"]
        assert fig.axes[2].get_yscale() == "log"
        assert "tol_tp" in fig._suptitle.get_text() and "FAIL" in fig._suptitle.get_text()
    finally:
        report.plt.close(fig)


def test_bitwise_case_still_draws_every_curve(run_dir):
    fig = report.build_figure(run_dir, "bitwise_fsdp")
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
        report.plt.close(fig)


def test_plot_case_writes_png_and_svg(run_dir):
    png, svg = report.plot_case(run_dir, "tol_tp")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.read_text().lstrip().startswith("<?xml")
    assert not list(png.parent.glob(".*.tmp"))


def test_report_names_every_case_and_leaves_data_alone(run_dir):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    md, page = report.write_report(run_dir)
    text = md.read_text()
    for case in ("bitwise_fsdp", "tol_tp", "unjudged"):
        assert f"| {case} |" in text and case in page.read_text()
    assert "no verdict" in text
    assert "![tol_tp](tol_tp/tol_tp.png)" in text
    assert all(p.read_bytes() == b for p, b in before.items())


def test_report_html_is_self_contained(run_dir):
    _, page = report.write_report(run_dir)
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
    text, changed = report.regression_report(old, run_dir)
    assert changed == [] and "0 changed · 3 unchanged" in text
    path = old / "tol_tp" / "fsdp" / "metrics.csv"
    rows = records.read_metrics(path)
    rows[6]["loss"] = math.nextafter(rows[6]["loss"], math.inf)  # one ulp on one step
    records.write_metrics(path, rows)
    text, changed = report.regression_report(old, run_dir)
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
    text, changed = report.regression_report(new, run_dir)
    assert changed == ["bitwise_fsdp", "brand_new", "unjudged"]
    assert "PASS (bitwise, expect match) → FAIL" in text


def test_evidence_has_command_and_torch(run_dir):
    text = report.evidence(run_dir, "tol_tp")
    assert "parity run cases/tol_tp.toml --out 'runs/x y'" in text
    assert "2.11.0+cpu" in text and "cpu-gloo" in text and "tol_tp.png" in text
    assert "| tol_tp |" in text and "bitwise_fsdp" not in text
    # Without a recorded command, the CLI invocation that reproduces it.
    assert f"parity run cases/unjudged.toml --out {run_dir}" in report.evidence(run_dir, "unjudged")


def test_nonfinite_values_render(tmp_path):
    out = tmp_path / "run"
    bad = _metrics()
    bad[5]["loss"] = float("nan")
    bad[6]["grad_norm"] = float("inf")
    make_case(out, "blowup", {"ref": _metrics(), "bad": bad}, mode="tolerance")
    png, _ = report.plot_case(out, "blowup")
    assert png.stat().st_size > 0
    md, _ = report.write_report(out)
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
    _, page = report.write_report(run_dir)
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
