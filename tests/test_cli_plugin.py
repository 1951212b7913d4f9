"""The user contract end to end: `parity run` exit codes and `pytest parity` with baselines."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parity.core import records
from test_config import CASE as TWIN_CASE  # two identical single-process setups, the smallest case

REPO = Path(__file__).resolve().parent.parent

LR_CASE = """
description = "the second setup trains with a 1% larger learning rate"
[train]
model = "tiny"
steps = 2
global_batch = 4
seq_len = 16
[setups.base]
dp_api = "none"
[setups.lr_plus_1pct]
dp_api = "none"
lr = 0.000808
[expect]
mode = "bitwise"
outcome = "{outcome}"
"""

SMALL_CASE = """
description = "replicate against HSDP (2, 1) at two ranks, bitwise"
[train]
model = "tiny"
steps = 3
global_batch = 4
seq_len = 16
[setups.replicate]
dp_api = "replicate"
dp_replicate = 2
[setups.hsdp]
dp_api = "fully_shard"
dp_replicate = 2
dp_shard = 1
"""


def run(args, cwd, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def cache_env(seed_cache):
    return {"PARITY_CACHE": str(seed_cache)}


def test_bad_case_exits_2_with_one_line_and_writes_nothing(tmp_path, cache_env):
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL_CASE.replace("dp_shard = 1", "dp_shard = 1\ntp = 3"))
    out = tmp_path / "out"
    r = run([sys.executable, "-m", "parity.cli", "run", str(bad), "--out", str(out)], tmp_path, cache_env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert f"{bad}: setups.hsdp.tp: 3 does not divide n_heads" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_lr_one_percent_higher_fails_match_at_step_2_and_passes_diverge(tmp_path, cache_env):
    """Both cases in one run: their setups are the same, so the suite trains them once, and each case is
    judged on its own expectation."""
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "lr_match.toml").write_text(LR_CASE.format(outcome="match"))
    (cases / "lr_diverge.toml").write_text(LR_CASE.format(outcome="diverge"))
    both = run([sys.executable, "-m", "parity.cli", "run", "--device", "cpu", "--baselines", str(tmp_path / "b"),
                "--update-baselines=new", "--no-report", str(cases / "lr_match.toml"), str(cases / "lr_diverge.toml"),
                "--out", str(tmp_path / "o")], tmp_path, cache_env)
    assert both.returncode == 1, both.stdout + both.stderr  # lr_match failed
    match_out, diverge_out = both.stdout.split("\nlr_diverge: ", 1)
    # A failing pair is no baseline: --update-baselines=new writes nothing and says why.
    assert not (tmp_path / "b" / "lr_match").exists()
    assert "--update-baselines=new wrote nothing: the case failed" in match_out
    verdict = records.read_json(tmp_path / "o" / "lr_match" / "verdict.json")
    # step 1 uses the warmup lr on identical seed weights: the loss is equal; step 2 sees the update
    assert verdict["pairs"][0]["diverged"]["metric"] == "loss"
    assert verdict["pairs"][0]["diverged"]["step"] == 2
    assert records.read_json(tmp_path / "o" / "lr_diverge" / "verdict.json")["passed"], diverge_out
    assert (tmp_path / "b" / "lr_diverge").is_dir()  # a passing control makes its baselines
    # What a reader sees first is the earliest entry in causal order: the lr first shows in step 1's weight update.
    assert diverge_out.startswith("PASS") and "base vs lr_plus_1pct: PASS; diverged as a control must: first not " \
           "bitwise: step 1, update, " in diverge_out, diverge_out


@pytest.mark.slow
def test_collection_ids_and_markers_for_committed_cases(tmp_path):
    def collected(marker: str) -> list[str]:
        # Its own --parity-out: a session that collects the cases first clears the case folders in its out,
        # and under `pytest -n 2` the repository's default out holds the other worker's running cases.
        r = run([sys.executable, "-m", "pytest", "parity", "--collect-only", "-q", "-m", marker, "-p",
                 "no:cacheprovider", f"--parity-out={tmp_path / 'out'}"], REPO)
        assert r.returncode in (0, 5), r.stdout + r.stderr  # 5: nothing selected
        return sorted(line.split("[", 1)[1].rstrip("]") for line in r.stdout.splitlines() if "::test_case[" in line)

    names = sorted(p.stem for p in (REPO / "cases").glob("*.toml"))
    titan = [n for n in names if "titan" in n]
    assert titan and collected("torchtitan") == titan
    eight = collected("8gpu")
    assert eight and sorted(eight + collected("1gpu or 2gpu or 4gpu")) == names
    assert not set(eight) & set(titan)  # the torchtitan cases run at 1 or 2 ranks


@pytest.mark.slow
def test_baseline_tamper_fails_then_update_restores_only_that_file(tmp_path, cache_env):
    cases, baselines, out = tmp_path / "cases", tmp_path / "baselines", tmp_path / "out"
    cases.mkdir()
    (cases / "small.toml").write_text(TWIN_CASE)  # two identical one-process setups: one rank trains them once
    pytest_cmd = [sys.executable, "-m", "pytest", "parity", "-p", "no:cacheprovider", "--parity-device", "cpu",
                  f"--parity-cases={cases}", f"--parity-baselines={baselines}", f"--parity-out={out}", "-q"]
    created = run(pytest_cmd + ["--parity-update-baselines=new"], REPO, cache_env)
    assert created.returncode == 0, created.stdout
    assert (out / "report.html").is_file() and "parity report:" in created.stdout
    assert "parity: small PASS on cpu/gloo" in created.stdout
    assert "parity: cases per device: cpu/gloo 1" in created.stdout
    # A session that runs no case (here: one unit test) neither reports nor rewrites the verdicts that an
    # earlier session left in --parity-out.
    written = (out / "report.html").stat().st_mtime_ns
    (tmp_path / "test_unit.py").write_text("def test_unit():\n    assert True\n")
    idle = run([sys.executable, "-m", "pytest", str(tmp_path / "test_unit.py"), "-p", "no:cacheprovider",
                f"--parity-out={out}", "-q"], REPO, cache_env)
    assert idle.returncode == 0 and "parity report:" not in idle.stdout and "small PASS" not in idle.stdout, idle.stdout
    assert (out / "report.html").stat().st_mtime_ns == written
    # The reproduce command passes on the case folder given on the command line (no configuration names it).
    command = records.read_json(out / "small" / "b" / "run.json")["command"]
    assert command[:3] == ["pytest", "--pyargs", "parity.test_parity::test_case[small]"], command
    assert f"--parity-cases={cases}" in command and f"--parity-baselines={baselines}" in command
    tampered_path = baselines / "small" / "b.cpu.csv"
    untouched_path = baselines / "small" / "a.cpu.csv"
    untouched = untouched_path.read_bytes()
    lines = tampered_path.read_text().splitlines()
    row = next(i for i, l in enumerate(lines) if l.startswith("2,"))
    cells = lines[row].split(",")
    cells[1] = repr(float(cells[1]) * (1 + 1e-4))
    lines[row] = ",".join(cells)
    tampered_path.write_text("\n".join(lines) + "\n")
    failed = run(pytest_cmd, REPO, cache_env)
    assert failed.returncode == 1
    assert "small" in failed.stdout
    assert "b loss step 2: baseline " in failed.stdout, failed.stdout
    assert (out / "small" / "b.obtained.csv").is_file()
    fixed = run(pytest_cmd + ["--parity-update-baselines"], REPO, cache_env)
    assert fixed.returncode == 0, fixed.stdout
    assert untouched_path.read_bytes() == untouched
    restored = records.read_csv(tampered_path)[1]
    assert restored[1]["loss"] == records.read_metrics(out / "small" / "b" / "metrics.csv")[1]["loss"]
    # The restored baselines pass: the fixed run judged against them again, without training a third time.
    again = run([sys.executable, "-m", "parity.cli", "compare", str(out), str(cases), f"--baselines={baselines}"],
                REPO, cache_env)
    assert again.returncode == 0 and "small: PASS" in again.stdout, again.stdout + again.stderr


def test_list_shows_every_case_with_world_size_mode_outcome_markers():
    r = run([sys.executable, "-m", "parity.cli", "list"], REPO)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert set(lines) == {p.stem for p in (REPO / "cases").glob("*.toml")}
    control = lines["control_divide_factor"].split()
    assert control[1] == "8" and "tolerance" in control and "diverge" in control and control[-2:] == ["cpu", "8gpu"]


@pytest.mark.slow
def test_pytest_cuda_without_gpus_skips_naming_case_or_fails_strict(tmp_path):
    if __import__("torch").cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs")
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "small.toml").write_text(textwrap.dedent(SMALL_CASE))
    cmd = [sys.executable, "-m", "pytest", "parity", "-p", "no:cacheprovider", "--parity-device", "cuda",
           f"--parity-cases={cases}", f"--parity-out={tmp_path / 'out'}", "-q", "-rs"]
    skipped = run(cmd, REPO)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert "case small needs 2 GPUs (one per rank of its largest setup), 0 visible" in skipped.stdout
    strict = run(cmd + ["--parity-strict"], REPO)
    assert strict.returncode == 1 and "case small needs 2 GPUs" in strict.stdout
    assert not (tmp_path / "out" / "small").exists()  # never a quiet CPU run


@pytest.mark.slow
def test_pytest_xdist_workers_each_plan_their_own_share(tmp_path, cache_env):
    """Under -n 2 the cases that share a setup reach one worker, which trains it once for both; each
    case is still its own item with its own verdict."""
    cases = tmp_path / "cases"
    cases.mkdir()
    small = textwrap.dedent(SMALL_CASE)
    (cases / "a.toml").write_text(small)
    (cases / "b.toml").write_text(small.replace("[setups.hsdp]", "[setups.hsdp_2x1]"))  # the same two setups
    (cases / "c.toml").write_text(textwrap.dedent(LR_CASE.format(outcome="diverge")))
    out = tmp_path / "out"
    result = run([sys.executable, "-m", "pytest", "parity", "-p", "no:cacheprovider", "-n", "2", f"--parity-cases={cases}",
                  f"--parity-out={out}", f"--parity-baselines={tmp_path / 'baselines'}",
                  "--parity-update-baselines=new", "-q"], REPO, cache_env)  # new cases: their first baselines
    assert result.returncode == 0 and "3 passed" in result.stdout, result.stdout + result.stderr
    plans = {p.name: records.read_json(p) for p in out.glob("plan-gw*.json")}
    assert len(plans) == 2, sorted(plans)  # both workers planned a share
    trained = {p: [t["trained_as"] for launch in d["launches"] for t in launch["trainings"]] for p, d in plans.items()}
    ab = next(p for p, names in trained.items() if "a/replicate" in names)
    assert sorted(trained[ab]) == ["a/hsdp", "a/replicate"]  # b's two setups are a's, trained once
    assert records.read_json(out / "b" / "hsdp_2x1" / "run.json")["trained_as"] == "a/hsdp"


@pytest.mark.parametrize("folder, message", [
    ("missing", "is not a directory (--parity-cases, parity_cases or [tool.parity] cases); allowed: a directory"),
    ("empty", "no case files (*.toml) in this directory"),
])
def test_a_cases_folder_with_no_cases_is_a_usage_error_not_zero_cases(tmp_path, folder, message):
    """A typo in --parity-cases once collected one empty-parameter item and skipped it: the suite 'passed'."""
    (tmp_path / "empty").mkdir()
    r = run([sys.executable, "-m", "pytest", "parity", "--collect-only", "-q", "-p", "no:cacheprovider",
             f"--parity-cases={tmp_path / folder}"], REPO)
    assert r.returncode == 4 and message in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("out, baselines, message", [
    ("same", "same", "--parity-out {t}/same and --parity-baselines {t}/same are the same folder"),
    ("bl/runs", "bl", "the run directory lies inside the baseline root"),
    ("runs", "runs/bl", "the baseline root lies inside the run directory"),
])
def test_pytest_refuses_an_out_that_overlaps_the_baselines(tmp_path, out, baselines, message):
    """A run replaces its case folders: a baseline root inside --parity-out would be deleted by the next session."""
    (tmp_path / baselines).mkdir(parents=True)
    (tmp_path / baselines / "keep.csv").write_text("a baseline\n")
    r = run([sys.executable, "-m", "pytest", "parity", "-q", "-p", "no:cacheprovider", "-k", "replicate_vs_hsdp",
             f"--parity-out={tmp_path / out}", f"--parity-baselines={tmp_path / baselines}",
             "--parity-update-baselines=new"], REPO)
    assert r.returncode == 4 and message.format(t=tmp_path) in r.stderr, r.stdout + r.stderr
    assert (tmp_path / baselines / "keep.csv").read_text() == "a baseline\n"


def test_pytest_refuses_an_out_holding_other_work_and_keeps_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    r = run([sys.executable, "-m", "pytest", "parity", "-q", "-p", "no:cacheprovider", "-k", "replicate_vs_hsdp",
             f"--parity-out={out}"], REPO)
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"--parity-out {out}: holds 'report.md', which parity did not write" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.md"] and (out / "report.md").read_text() == "my notes\n"
