"""PR evidence (`parity evidence`): the Mermaid charts GitHub renders, the first divergence, the png format."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from test_report import STEPS, _metrics, make_case, run_dir  # noqa: F401  (run_dir: the fixture)

from parity import cli

from parity.report import evidence

from parity.core import records


def _charts(text: str) -> list[dict]:
    """Each mermaid block: its title, x-axis line and its lines' values."""
    charts = []
    for block in re.findall(r"```mermaid\n(.*?)```", text, re.S):
        assert "xychart-beta" in block
        charts.append({"title": re.search(r'title "([^"]*)"', block).group(1),
                       "x_axis": re.search(r"x-axis .*", block).group(0),
                       "palette": re.search(r'"plotColorPalette": "([^"]*)"', block).group(1).split(", "),
                       "lines": [[float(v) for v in row.split(", ")] for row in re.findall(r"line \[(.*)\]", block)]})
    return charts


def _close(drawn: list[float], recorded, rel: float = 1e-5) -> bool:
    """Drawn with six significant digits: equal to the record to about 1e-6 relative."""
    return len(drawn) == len(recorded) and all(math.isclose(d, r, rel_tol=rel) for d, r in zip(drawn, recorded))


def test_default_has_table_first_divergence_and_one_line_per_setup(run_dir):  # noqa: F811
    text = evidence.evidence(run_dir, "tol_tp")
    assert "| tol_tp |" in text and "bitwise_fsdp" not in text
    assert "tol_tp.png" not in text  # nothing a PR comment cannot show
    # The headline as the verdict computed it, its values checked against the records themselves.
    h = records.read_json(run_dir / "tol_tp" / "verdict.json")["pairs"][1]["headline"]
    m, step = h["lane"], h["entry"]["step"]
    ref = records.read_metrics(run_dir / "tol_tp" / "ddp" / "metrics.csv")[step - 1][m]
    other = records.read_metrics(run_dir / "tol_tp" / "tp" / "metrics.csv")[step - 1][m]
    assert f"`tp` vs `ddp`: **first beyond tolerance: {m} at step {step} (rel " \
           f"{abs(other - ref) / ref:.2g}" in text
    assert f"**; {ref!r} vs {other!r} (rel {abs(other - ref) / ref:.3g}, abs {abs(other - ref):.3g}, " in text
    assert "`fsdp` vs `ddp`: **bitwise equal: every compared entry**" in text
    charts = _charts(text)
    assert [c["title"] for c in charts] == ["tol_tp: loss", "tol_tp: grad norm"]
    for chart, metric in zip(charts, ("loss", "grad_norm")):
        assert chart["x_axis"] == 'x-axis "step" [' + ", ".join(str(s) for s in range(1, STEPS + 1)) + "]"
        assert len(chart["lines"]) == 3 and len(chart["palette"]) == 3
        for line, setup in zip(chart["lines"], ("ddp", "fsdp", "tp")):
            recorded = [r[metric] for r in records.read_metrics(run_dir / "tol_tp" / setup / "metrics.csv")]
            assert _close(line, recorded), (setup, metric)
    assert "`ddp` blue, `fsdp` orange, `tp` green" in text
    assert "parity run cases/tol_tp.toml --out 'runs/x y'" in text and "2.11.0+cpu" in text


def test_equal_curves_are_said_to_cover_each_other(run_dir):  # noqa: F811
    text = evidence.evidence(run_dir, "bitwise_fsdp")
    assert text.count("Every line is equal to the first at every step") == 2
    assert "Every line is equal" not in evidence.evidence(run_dir, "tol_tp").split("grad norm")[0]


def _long_case(out, n: int):
    """Two setups over n steps: `b` is `a` plus 0.5, with a loss spike in the middle and NaN grad norms."""
    steps = np.arange(1, n + 1)
    loss = 2.0 + 8.0 * np.exp(-steps / (n / 6)) + 0.01 * np.sin(steps)
    columns = {"a": (loss, 1.0 + 0.1 * np.cos(steps)), "b": (loss + 0.5, 1.2 + 0.1 * np.cos(steps))}
    columns["b"][0][n // 2 + 17] = 40.0
    columns["b"][1][n // 3:n // 3 + 5] = np.nan
    rows = {name: [{"step": int(s), "loss": float(lo), "grad_norm": float(g)} for s, lo, g in zip(steps, *cols)]
            for name, cols in columns.items()}
    make_case(out, "long", rows, verdict=False)
    return columns


def test_long_run_is_decimated_fast_keeping_first_last_step_and_spike(tmp_path):
    n = 100_000
    columns = _long_case(tmp_path, n)
    start = time.perf_counter()
    text = evidence.evidence(tmp_path, "long")
    took = time.perf_counter() - start
    assert took < 2.0, f"evidence took {took:.2f}s for {n} steps"
    loss, grad_norm = _charts(text)
    assert loss["x_axis"] == f'x-axis "step" 1 --> {n}'
    for chart, col in ((loss, 0), (grad_norm, 1)):
        assert [len(line) for line in chart["lines"]] == [evidence.POINTS, evidence.POINTS]
        for line, setup in zip(chart["lines"], ("a", "b")):
            recorded = columns[setup][col]
            assert _close([line[0], line[-1]], [recorded[0], recorded[-1]]), (setup, col)
    a, b = loss["lines"]
    assert max(b) == 40.0 and max(a) < 11  # the spike survives and is b's, not a's
    assert all(y - x == pytest.approx(0.5, abs=0.05) for x, y in zip(a, b) if y != 40.0)
    assert f"{n} steps drawn as {evidence.POINTS} points per line" in text
    # NaN is never hidden: the line holds across it, and the text says where.
    assert all(math.isfinite(v) for line in grad_norm["lines"] for v in line)
    assert f"`b` grad norm is **NaN** at 5 of {n} steps (first: step {n // 3 + 1})" in text


def test_decimate_keeps_each_buckets_extremes_in_step_order():
    values = np.tile(np.arange(1000, dtype=np.float64), (2, 1))
    values[1] = -values[1]
    values[0, 506] = 1e9  # inside a bucket (its ends are kept anyway by a monotone row)
    values[1, 300] = np.nan
    values[1, 303] = -1e9
    picked = evidence.decimate(values)
    assert picked.shape == (2, evidence.POINTS)
    assert (picked[:, 0] == 0).all() and (picked[:, -1] == 999).all()
    assert (np.diff(picked, axis=1) >= 0).all()
    assert 506 in picked[0] and 506 not in picked[1]
    assert 303 in picked[1] and 300 not in picked[1] and 303 not in picked[0]
    short = evidence.decimate(values[:, :evidence.POINTS])
    assert (short == np.arange(evidence.POINTS)).all()


def test_nan_and_inf_are_said_and_never_drawn(tmp_path):
    bad = _metrics()
    bad[5]["loss"] = float("nan")
    bad[6]["grad_norm"] = float("inf")
    make_case(tmp_path, "blowup", {"ref": _metrics(), "bad": bad}, mode="tolerance")
    text = evidence.evidence(tmp_path, "blowup")
    assert f"`bad` loss is **NaN** at 1 of {STEPS} steps (first: step 6)" in text
    assert f"`bad` grad norm is **inf** at 1 of {STEPS} steps (first: step 7)" in text
    for chart in _charts(text):
        assert all(math.isfinite(v) and len(line) == STEPS for line in chart["lines"] for v in line)
    assert "nan" not in "".join(re.findall(r"```mermaid\n.*?```", text, re.S)).lower()


def test_setup_without_metrics_is_said_not_drawn(tmp_path):
    make_case(tmp_path, "crashed", {"ddp": _metrics(), "tp": _metrics()}, verdict=False)
    (tmp_path / "crashed" / "tp" / "metrics.csv").unlink()
    run = records.read_json(tmp_path / "crashed" / "tp" / "run.json")
    records.write_json(tmp_path / "crashed" / "tp" / "run.json", {**run, "status": "failed"})
    text = evidence.evidence(tmp_path, "crashed")
    assert text.count("`tp` recorded no metrics (status failed): no line.") == 2
    assert [len(c["lines"]) for c in _charts(text)] == [1, 1]
    (tmp_path / "crashed" / "ddp" / "metrics.csv").unlink()
    text = evidence.evidence(tmp_path, "crashed")
    assert "```mermaid" not in text and "_crashed: loss: nothing to draw._" in text


def test_png_format_links_the_figure(run_dir):  # noqa: F811
    text = evidence.evidence(run_dir, "tol_tp", "png")
    assert f"![tol_tp]({(run_dir / 'tol_tp' / 'tol_tp.png').as_posix()})" in text
    assert "```mermaid" not in text and "`tp` vs `ddp`: **first beyond tolerance: " in text
    assert "parity run cases/tol_tp.toml --out 'runs/x y'" in text
    # Without a recorded command, the CLI invocation that reproduces it; run_dir lies outside this repository, so
    # the reproduction writes to its default run directory.
    unjudged = evidence.evidence(run_dir, "unjudged", "png")
    assert unjudged.endswith("Reproduce (from the repository root):\n\n```sh\nparity run cases/unjudged.toml\n```\n")


def test_cli_format_flag(run_dir, capsys):  # noqa: F811
    assert cli.EVIDENCE_FORMATS == evidence.FORMATS
    assert cli.main(["evidence", str(run_dir), "--case", "tol_tp"]) == 0
    assert "```mermaid" in capsys.readouterr().out
    assert cli.main(["evidence", str(run_dir), "--case", "tol_tp", "--format", "png"]) == 0
    assert "tol_tp.png" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evidence", str(run_dir), "--format", "svg"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--format" in err and "'mermaid'" in err and "'png'" in err


# ----------------------------------------------------------------------------- a real renderer

CHROMIUM = "/usr/bin/chromium"
# Not on CI (its time is tight); the test writes the puppeteer config it passes to mmdc with -p.
INSTALL = ("apt-get install chromium; PUPPETEER_SKIP_DOWNLOAD=1 npm install -g @mermaid-js/mermaid-cli "
           "(or set PARITY_MMDC to an mmdc binary); mmdc then runs with -p puppeteer.json holding "
           '{"executablePath": "/usr/bin/chromium", "args": ["--no-sandbox"]}')


def _mmdc() -> str | None:
    return os.environ.get("PARITY_MMDC") or shutil.which("mmdc")


def test_mermaid_renders_with_mermaid_cli(run_dir, tmp_path):  # noqa: F811
    """mermaid-cli draws every chart of the block with Chromium, as GitHub draws them in a comment."""
    mmdc = _mmdc()
    if mmdc is None or not os.access(mmdc, os.X_OK):
        pytest.skip(f"mermaid-cli (mmdc) not found on PATH or in PARITY_MMDC; to run this test: {INSTALL}")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found; to run this test: {INSTALL}")
    config = tmp_path / "puppeteer.json"
    config.write_text(json.dumps({"executablePath": CHROMIUM, "args": ["--no-sandbox"]}))
    page = tmp_path / "evidence.md"
    text = evidence.evidence(run_dir)
    page.write_text(text)
    # A markdown input: mmdc renders each mermaid block to its own SVG, as GitHub does in a comment.
    r = subprocess.run([mmdc, "-i", str(page), "-o", str(tmp_path / "out.md"), "-p", str(config)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    svgs = sorted(tmp_path.glob("out-*.svg"), key=lambda p: int(p.stem.split("-")[1]))
    charts = _charts(text)
    assert len(svgs) == len(charts) == 6  # loss and grad norm for each of three cases
    for svg, chart in zip(svgs, charts):
        doc = svg.read_text()
        assert "Syntax error" not in doc and chart["title"] in doc
        # One path per line, in the colour the text under the chart names for it, through all its points.
        paths = re.findall(r'<g class="line-plot-\d+"><path d="([^"]*)"[^>]*stroke="([^"]+)"', doc)
        assert [stroke for _, stroke in paths] == chart["palette"], svg.name
        assert [d.count("L") + 1 for d, _ in paths] == [len(line) for line in chart["lines"]], svg.name


def test_a_statistical_divergence_is_said_as_the_window_that_left_the_band(tmp_path):
    """A statistical pair's headline is a window of steps outside the ensemble's band, not a step."""
    make_case(tmp_path, "drift", {"ref": _metrics(), "other": _metrics()}, mode="tolerance")
    path = tmp_path / "drift" / "verdict.json"
    verdict = records.read_json(path)
    band = {"step": 50, "window": [26, 50], "value_ref": 3.1002, "value_other": 3.2154, "abs": 0.1152,
            "rel": 0.0372, "z": 41.3, "limit": 7.02}
    verdict["pairs"][0]["headline"] = {"text": "first outside the band: loss over steps 26-50 (rel 0.037, z 41.3 "
                                               "(limit 7.02))", "lane": "loss", "basis": "outside the band",
                                       "entry": band, "not_bitwise_lane": None, "not_bitwise": None}
    records.write_json(path, verdict)
    text = evidence.evidence(tmp_path, "drift")
    assert ("`other` vs `ref`: **first outside the band: loss over steps 26-50 (rel 0.037, z 41.3 (limit 7.02))**; "
            "steps 26-50: 3.2154 vs ensemble mean 3.1002 (rel 0.0372, z 41.3, limit 7.02)") in text


def test_provenance_names_the_code_under_test_parity_the_platform_and_a_command_from_the_root(tmp_path, monkeypatch):
    """Evidence stands alone: which commit of the user's repository ran (and which torchtitan), which parity judged
    it, on what, and how to reproduce it from the repository root, without a path of the machine that ran it."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "trainer"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    out = repo / "reports" / "parity"
    make_case(out, "tol_tp", {"ddp": _metrics(), "tp": _metrics(1e-6)}, mode="tolerance")
    # Recorded as a run before relative commands did: absolute paths, one with a space, an --out outside.
    command = ["parity", "run", str(repo / "my cases" / "tol_tp.toml"), "--device", "cpu", "--out",
               str(tmp_path / "elsewhere"), "--baselines", str(repo / "baselines")]
    for setup, extra in (("ddp", {}), ("tp", {"torchtitan_commit": "fedcba9-dirty"})):
        path = out / "tol_tp" / setup / "run.json"
        records.write_json(path, {**records.read_json(path), "git_commit": "0123abc-dirty", "parity_version": "0.1.0",
                                  "parity_commit": None, "command": command, **extra})
    platform = records.read_json(out / "tol_tp" / "verdict.json")["platform"]
    for block_format in evidence.FORMATS:
        text = evidence.evidence(out, "tol_tp", block_format)
        assert f"platform `{platform}` · backend `gloo`" in text, block_format
        assert "commit under test `0123abc-dirty` · torchtitan commit `fedcba9-dirty` · parity `0.1.0`" in text
        reproduce = text[text.index("Reproduce (from the repository root):"):]
        assert "```sh\nparity run 'my cases/tol_tp.toml' --device cpu --baselines baselines\n```" in reproduce
        assert str(tmp_path) not in reproduce
    # parity run from a checkout of itself names its commit too.
    for setup in ("ddp", "tp"):
        path = out / "tol_tp" / setup / "run.json"
        records.write_json(path, {**records.read_json(path), "parity_commit": "c0ffee1"})
    assert "parity `0.1.0 (checkout c0ffee1)`" in evidence.evidence(out, "tol_tp")
