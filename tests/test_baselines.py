"""Stored baselines: paths, bit-exact I/O, check and update modes, unused files, lint."""

import math
from dataclasses import replace
import struct
from pathlib import Path

import numpy as np
import pytest

from parity.core import records
from parity.verdict.baselines import (
    PROVENANCE, baseline_path, check_baseline, check_case_baselines, check_case_files, lint, read_baseline,
    unused_baselines, write_baseline,
)
from parity.report import evidence, tables
from parity.report.model import load_case_run
from parity.session import judge
from parity.verdict.case_verdict import compare_case, write_verdict
from parity.verdict.formatting import divergence_table, format_verdict
from parity.verdict.model import ABSENT, read_verdict
from parity.case.schema import Case, Expect, Setup, Tolerance, Train

TOL = {"loss": Tolerance(1e-5, 0.0), "grad_norm": Tolerance(1e-4, 0.0), "weights": Tolerance(1e-4, 0.0)}
RNG = np.random.default_rng(7)
LOSS = [float(x) for x in 7.0 - np.sort(RNG.random(5))]
GNORM = [float(x) for x in 1.0 + RNG.random(5)]
TORCH = "2.13.0+cpu"


def make_case(names=("ref", "other"), name="demo") -> Case:
    setups = tuple(Setup(name=n, train=Train(steps=len(LOSS))) for n in names)
    expect = Expect(tolerance=TOL, tolerance_source={m: "default for float32" for m in TOL})
    return Case(name=name, path=Path(f"cases/{name}.toml"), description="d", setups=setups, expect=expect,
                sha256="c" * 64)


def rows(loss=LOSS, gnorm=GNORM):
    return [{"step": i + 1, "loss": l, "grad_norm": g, "lr": 8e-4 * min(1.0, (i + 1) / 2), "tokens": 2048 * (i + 1),
             "step_time_s": 0.25} for i, (l, g) in enumerate(zip(loss, gnorm))]


def write_run(out: Path, setup: str, metric_rows=None, status="ok", torch=TORCH, case="demo", isa="AVX512", threads=1):
    d = out / case / setup
    records.write_metrics(d / "metrics.csv", metric_rows if metric_rows is not None else rows())
    records.write_weights(d / "weights.csv", [{"param": "w", "norm": 1.2345678901234567, "sha256": "a" * 64}])
    records.write_json(d / "run.json", {
        "case": case, "setup": setup, "status": status, "torch": torch, "device": "cpu", "platform": "cpu",
        "fingerprint": {"torch": torch, "cpu_model": "Test CPU", "cpu_capability": isa, "threads": threads, "platform": "cpu"},
        "world_size": 8, "mesh_shape": [2, 4], "mesh_dim_names": ["dp_replicate", "dp_shard"],
        "seed_checkpoint_sha256": "5" * 64, "case_sha256": "c" * 64, "git_commit": "abc123"})


@pytest.fixture
def runs(tmp_path):
    """A case with two setups run, baselines written for both; returns (case, run_dir, root)."""
    case, run_dir, root = make_case(), tmp_path / "out", tmp_path / "baselines"
    write_run(run_dir, "ref")
    write_run(run_dir, "other")
    for b in check_case_baselines(case, run_dir, root, update="new"):
        assert b.status == "updated" and b.passed
    return case, run_dir, root


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


# ---- platform key and paths ----------------------------------------------------------------

def test_baseline_path():
    assert baseline_path("b", "case1", "hsdp", "cuda-h100") == Path("b/case1/hsdp.cuda-h100.csv")
    assert baseline_path(None, "case1", "ref", "cpu") == Path("baselines/case1/ref.cpu.csv")


# ---- file format ---------------------------------------------------------------------------

def test_round_trip_is_bit_exact(tmp_path):
    values = [5e-324, 1e-300, 0.1 + 0.2, -0.0, 1.7976931348623157e308, 7.123456789012345]
    path = tmp_path / "b.csv"
    write_baseline(path, rows(loss=values, gnorm=values[::-1]), {"torch": TORCH, "mesh": "dp_shard=8"})
    header, back = records.read_csv(path)
    assert [bits(r["loss"]) for r in back] == [bits(v) for v in values]
    assert [bits(r["grad_norm"]) for r in back] == [bits(v) for v in values[::-1]]
    assert header["torch"] == TORCH and header["mesh"] == "dp_shard=8"
    assert list(back[0]) == ["step", "loss", "grad_norm", "lr", "tokens"]


def test_corrupted_file_names_file_and_line(tmp_path, runs):
    case, run_dir, root = runs
    path = root / "demo" / "ref.cpu.csv"
    lines = path.read_text().splitlines()
    bad_line = len(lines) - 1  # 1-based number of the second-to-last line
    lines[bad_line - 1] = lines[bad_line - 1].replace(".", "x", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(records.RecordError, match=rf"{path}:{bad_line}: column 'loss'"):
        records.read_csv(path)
    # Malformed input, not a numerics failure: refused before anything runs (exit 2), naming file and line.
    with pytest.raises(records.RecordError, match=rf"{path}:{bad_line}:.*--update-baselines=failing"):
        check_case_files(case, root, None)
    with pytest.raises(records.RecordError, match=rf"{path}:{bad_line}:"):
        check_baseline(case, "ref", run_dir, root, "cpu", TORCH)
    check_case_files(case, root, "failing")  # a mode that rewrites it lets it through
    assert any(p.startswith(f"{path}:{bad_line}:") for p in lint(root))


# ---- checks --------------------------------------------------------------------------------

def test_match_exact(runs):
    case, run_dir, root = runs
    results = check_case_baselines(case, run_dir, root)
    assert [(b.setup, b.status, b.basis, b.passed) for b in results] == [
        ("ref", "match", "exact", True), ("other", "match", "exact", True)]
    assert results[0].metrics["loss"].exact_equal_steps == 5 and results[0].obtained is None
    assert set(results[0].to_json()) == {"setup", "path", "platform", "status", "how", "passed", "metrics", "message",
                                         "obtained", "triage"}
    assert results[0].triage is None  # a matching baseline has nothing to triage
    assert set(results[0].metrics) == {"loss", "grad_norm"}
    header, _ = records.read_csv(root / "demo" / "ref.cpu.csv")
    assert all(header.get(k) for k in PROVENANCE)
    assert header["mesh"] == "dp_replicate=2xdp_shard=4" and header["git_commit"] == "abc123"


def test_missing_baseline_fails_with_create_command(tmp_path):
    case, run_dir, root = make_case(), tmp_path / "out", tmp_path / "baselines"
    write_run(run_dir, "ref")
    write_run(run_dir, "other")
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH)
    assert b.status == "missing" and not b.passed and b.triage is None
    assert "parity run cases/demo.toml --update-baselines=new" in b.message
    assert "pytest --pyargs 'parity.test_parity::test_case[demo]' --parity-update-baselines=new" in b.message
    assert not (root / "demo" / "ref.cpu.csv").exists()  # update None never writes
    v = compare_case(case, run_dir, [b])
    assert not v.passed and "--update-baselines=new" in divergence_table(v)


def nudge(path: Path, step: int, factor=1 + 1e-4, to=None):
    """Change the baseline's loss at `step`: times `factor`, or to `to(loss)`; returns the stored value."""
    header, back = records.read_csv(path)
    value = back[step - 1]["loss"]
    back[step - 1]["loss"] = to(value) if to else value * factor
    write_baseline(path, back, header)
    return back[step - 1]["loss"]


def one_ulp_up(x: float) -> float:
    return float(np.nextafter(x, math.inf))


def test_changed_loss_is_a_mismatch_naming_setup_metric_step(runs):
    case, run_dir, root = runs
    stored = nudge(root / "demo" / "other.cpu.csv", step=3)
    results = check_case_baselines(case, run_dir, root)
    ref, other = results
    assert ref.status == "match"
    assert other.status == "mismatch" and not other.passed
    assert "other loss step 3" in other.message and repr(stored) in other.message
    assert "drift" not in other.message
    assert other.metrics["loss"].first_not_bitwise["step"] == 3
    assert other.metrics["grad_norm"].passed
    obtained = run_dir / "demo" / "other.obtained.csv"
    assert other.obtained == str(obtained)
    assert [bits(r["loss"]) for r in records.read_csv(obtained)[1]] == [bits(x) for x in LOSS]
    v = compare_case(case, run_dir, results)
    assert not v.passed and v.problems[0].startswith("baseline other: ")
    table = divergence_table(v)
    assert "baseline other vs run" in table and repr(stored) in table and repr(LOSS[2]) in table


def test_update_failing_rewrites_only_that_file(runs):
    case, run_dir, root = runs
    ref_path, other_path = root / "demo" / "ref.cpu.csv", root / "demo" / "other.cpu.csv"
    nudge(other_path, step=2)
    before = (ref_path.read_bytes(), ref_path.stat().st_mtime_ns)
    results = check_case_baselines(case, run_dir, root, update="failing")
    assert [(b.status, b.passed) for b in results] == [("match", True), ("updated", True)]
    assert str(other_path) in results[1].message and "other loss step 2" in results[1].message
    assert (ref_path.read_bytes(), ref_path.stat().st_mtime_ns) == before
    assert [b.status for b in check_case_baselines(case, run_dir, root)] == ["match", "match"]


def test_update_new_does_not_overwrite_a_mismatch(runs):
    case, run_dir, root = runs
    path = root / "demo" / "other.cpu.csv"
    nudge(path, step=2)
    before = path.read_bytes()
    b = check_baseline(case, "other", run_dir, root, "cpu", TORCH, update="new")
    assert b.status == "mismatch" and not b.passed and path.read_bytes() == before


def test_update_all_rewrites_matching_and_none_never_writes(runs):
    case, run_dir, root = runs
    path = root / "demo" / "ref.cpu.csv"
    path.write_text(path.read_text().replace("# date: ", "# date: 1999-"))
    before = path.read_bytes()
    assert check_baseline(case, "ref", run_dir, root, "cpu", TORCH).status == "match"
    assert check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update="failing").status == "match"
    assert path.read_bytes() == before  # a matching baseline is left alone
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update="all")
    assert b.status == "updated" and b.passed and path.read_bytes() != before
    with pytest.raises(ValueError, match="update mode"):
        check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update="everything")


def test_other_cpu_instruction_set_compares_within_tolerance(runs):
    """CPU kernels dispatch on AVX2/AVX512: a baseline made on the other set is not a bitwise reference."""
    case, run_dir, root = runs
    write_run(run_dir, "ref", rows(loss=[float(np.nextafter(x, math.inf)) for x in LOSS]), isa="AVX2")
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH)
    assert b.basis == "tolerance" and b.passed and "cpu_capability: AVX512 vs AVX2" in b.message


def test_other_thread_count_compares_within_tolerance_and_old_baselines_mean_one_thread(runs):
    """Intra-op threads split CPU reductions; a baseline without a thread count was made with one."""
    case, run_dir, root = runs
    write_run(run_dir, "ref", rows(loss=[float(np.nextafter(x, math.inf)) for x in LOSS]), threads=4)
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH)
    assert b.basis == "tolerance" and b.passed and "threads: 1 vs 4" in b.message
    path = root / "demo" / "ref.cpu.csv"
    path.write_text("".join(l for l in path.read_text().splitlines(True) if not l.startswith("# threads:")))
    write_run(run_dir, "ref", threads=1)
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH)
    assert b.basis == "exact" and b.status == "match"
    write_run(run_dir, "ref", threads=2)
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH)
    assert b.basis == "tolerance" and "threads: not recorded vs 2" in b.message


def test_other_torch_version_compares_within_tolerance(runs):
    case, run_dir, root = runs
    close = [float(np.nextafter(x, math.inf)) for x in LOSS]
    write_run(run_dir, "ref", rows(loss=close), torch="2.14.0")
    b = check_baseline(case, "ref", run_dir, root, "cpu", "2.14.0")
    assert b.basis == "tolerance" and b.status == "match" and b.passed
    assert not b.metrics["loss"].bitwise and "2.14.0" in b.message
    assert b.triage is None  # it passed: nothing to triage
    # Same torch and platform: the one-ULP change fails the exact comparison, and is triaged as drift.
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH)
    assert b.basis == "exact" and b.status == "mismatch"
    rel = max(abs(c - x) / x for c, x in zip(close, LOSS))
    t = b.triage
    assert (t.kind, t.metric, t.step, t.where) == ("drift", "loss", 1, "")
    assert t.max_rel == rel and t.entry["value_ref"] == LOSS[0] and t.entry["value_other"] == close[0]
    assert t.line == ("environment drift: not bitwise from step 1 (loss), every step within tolerance "
                      f"(max rel {rel:.1e})")
    assert "--update-baselines=drift" in b.message  # the mode that accepts drift, and only drift
    # Other torch, but beyond tolerance: fails, and a tolerance-basis failure is a change, not drift.
    write_run(run_dir, "ref", rows(loss=[x * (1 + 1e-4) for x in LOSS]), torch="2.14.0")
    b = check_baseline(case, "ref", run_dir, root, "cpu", "2.14.0")
    assert b.basis == "tolerance" and b.status == "mismatch"
    assert (b.triage.kind, b.triage.metric, b.triage.step) == ("changed", "loss", 1)


def test_failed_run_is_an_error_and_writes_nothing(tmp_path):
    case, run_dir, root = make_case(), tmp_path / "out", tmp_path / "baselines"
    write_run(run_dir, "ref", status="failed")
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update="all")
    assert b.status == "error" and not b.passed and not (root / "demo").exists()
    write_run(run_dir, "ref", rows(loss=[math.nan] * 5))
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update="all")
    assert b.status == "error" and "NaN" in b.message and not (root / "demo").exists()


def test_a_run_cut_short_compares_a_prefix_and_only_a_case_made_shorter_shortens_a_baseline(runs):
    case, run_dir, root = runs
    path = root / "demo" / "ref.cpu.csv"
    write_run(run_dir, "ref", rows()[:3])
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update="failing")
    assert b.status == "match" and "first 3 of 5 steps" in b.message
    write_run(run_dir, "ref", rows(loss=[x * 2 for x in LOSS])[:3])
    before = path.read_bytes()
    for mode in ("failing", "all"):
        b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update=mode)
        assert b.status == "mismatch" and path.read_bytes() == before
        assert "fewer steps than its case declares (a --steps override)" in b.message
    write_run(run_dir, "ref", rows() + [dict(rows()[-1], step=6)])
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH)  # longer: step 6 is unverified, never drift
    assert b.status == "mismatch" and (b.triage.kind, b.triage.step) == ("changed", None)
    assert b.triage.line == "not drift: loss could not be judged step for step (run has steps 6 that baseline lacks)"
    # A case made shorter, run in full: its baseline of the old size is replaced (here under "all", matching).
    shorter = replace(case, setups=tuple(replace(s, train=replace(s.train, steps=3)) for s in case.setups))
    write_run(run_dir, "ref", rows()[:3])
    b = check_baseline(shorter, "ref", run_dir, root, "cpu", TORCH, update="all")
    assert b.status == "updated" and len(read_baseline(path)[1]) == 3
    write_run(run_dir, "ref", rows(loss=[x * 2 for x in LOSS])[:3])
    b = check_baseline(shorter, "ref", run_dir, root, "cpu", TORCH, update="failing")
    assert b.status == "updated" and read_baseline(path)[1][0]["loss"] == 2 * LOSS[0]


# ---- triage and the drift mode ---------------------------------------------------------------

def probes(out: Path, setup: str, scale: float = 1.0):
    """Two probe entries for a setup's run; `scale` changes the second, the backward one."""
    records.write_probes(out / "demo" / setup / "probes.csv", [
        {"step": 1, "phase": "forward", "name": "tok_embeddings", "stat": "sumsq", "value": 3.25},
        {"step": 1, "phase": "backward", "name": "output.weight", "stat": "sumsq", "value": 0.5 * scale}])


def test_a_loss_changed_by_1e_3_is_triaged_changed_at_its_step_with_its_rel(runs):
    case, run_dir, root = runs
    probes(run_dir, "ref")
    probes(run_dir, "other", scale=1 + 1e-3)  # the pair parts at the backward probe
    stored = nudge(root / "demo" / "other.cpu.csv", step=3, factor=1 + 1e-3)
    pairs = compare_case(case, run_dir).pairs
    ref, other = check_case_baselines(case, run_dir, root, pairs=pairs)
    assert ref.triage is None and other.status == "mismatch"
    t = other.triage
    rel = abs(LOSS[2] - stored) / abs(stored)  # relative to the baseline, which is the reference here
    assert (t.kind, t.metric, t.step) == ("changed", "loss", 3)
    assert (t.entry["value_ref"], t.entry["value_other"], t.entry["abs"]) == (stored, LOSS[2], abs(LOSS[2] - stored))
    assert math.isclose(t.entry["rel"], rel, rel_tol=1e-12) and t.max_rel == t.entry["rel"]
    assert t.line == f"numerics changed: loss beyond tolerance at step 3 (rel {rel:.1e})"
    # What can localise it, and no more: probes need a second run; the pair localises setups, not the baseline.
    assert "cannot say which module changed" in t.where
    assert "localising needs a second run to compare them against, e.g. one made at the baseline's commit abc123" \
        in t.where
    assert "between setups, not against the baseline" in t.where and "backward, output.weight" in t.where
    assert f"parity locate {run_dir} demo" in t.where
    # Where the pairs localised nothing, none is named; where the run has no probes, it says so.
    (run_dir / "demo" / "other" / "probes.csv").unlink()
    t = check_baseline(case, "other", run_dir, root, "cpu", TORCH, pairs=compare_case(case, run_dir).pairs).triage
    assert t.where.endswith("this run recorded no probes") and "second run" not in t.where
    assert "between setups" not in t.where
    # The terminal, the pytest failure and the report say it in words.
    v = compare_case(case, run_dir, [ref, other])
    line = "numerics changed: loss beyond tolerance at step 3"
    assert f"baseline other [cpu, exact]: mismatch FAIL: {line}" in format_verdict(v)
    assert f"    localisation: {other.triage.where}" in format_verdict(v)
    assert v.problems[-1].startswith(f"baseline other: {line}")
    assert f"baseline other: {other.triage.where}" in divergence_table(v)


def test_drift_mode_rewrites_drift_and_refuses_a_change(runs):
    case, run_dir, root = runs
    ref_path, other_path = root / "demo" / "ref.cpu.csv", root / "demo" / "other.cpu.csv"
    nudge(ref_path, step=2, to=one_ulp_up)
    nudge(other_path, step=3, factor=1 + 1e-3)
    before = other_path.read_bytes()
    verdict = judge(case, run_dir, root, "drift")
    ref, other = verdict.baselines
    assert (ref.status, ref.passed, ref.triage.kind, ref.triage.step) == ("updated", True, "drift", 2)
    assert "update mode drift" in ref.message
    assert [bits(r["loss"]) for r in records.read_csv(ref_path)[1]] == [bits(x) for x in LOSS]
    assert (other.status, other.passed, other.triage.kind) == ("mismatch", False, "changed")
    assert other_path.read_bytes() == before
    assert "update mode drift refused it: the numerics changed" in other.message
    assert [b.status for b in check_case_baselines(case, run_dir, root)] == ["match", "mismatch"]
    ref_path.unlink()  # drift mode writes no missing baseline
    b = check_baseline(case, "ref", run_dir, root, "cpu", TORCH, update="drift")
    assert (b.status, b.passed, b.triage) == ("missing", False, None) and not ref_path.exists()
    assert "update mode drift writes no missing baseline" in b.message and "--update-baselines=new" in b.message


def test_drift_is_a_mode_both_front_ends_parse(capsys):
    from parity import cli, plugin

    args = cli.parser().parse_args(["compare", "out", "demo", "--update-baselines=drift"])
    assert args.update_baselines == "drift"
    assert type(plugin._mode_or_path("drift")) is str  # a mode, not a swallowed path
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["run", "--help"])
    assert "--update-baselines [{failing,new,all,drift}]" in capsys.readouterr().out


def test_verdict_json_round_trips_the_triage(runs):
    case, run_dir, root = runs
    nudge(root / "demo" / "ref.cpu.csv", step=2, to=one_ulp_up)
    nudge(root / "demo" / "other.cpu.csv", step=3, factor=1 + 1e-3)
    verdict = compare_case(case, run_dir, check_case_baselines(case, run_dir, root))
    path = write_verdict(run_dir, verdict)
    assert read_verdict(path) == verdict
    data = records.read_json(path)
    assert [b["triage"]["kind"] for b in data["baselines"]] == ["drift", "changed"]
    assert set(data["baselines"][1]["triage"]) == {"kind", "metric", "step", "entry", "max_rel", "where", "line"}
    assert data["baselines"][1]["triage"]["entry"]["step"] == 3
    # The report and the PR evidence show it.
    case_run = load_case_run(run_dir, "demo")
    assert [r["triage"].split(";")[0] for r in tables.baseline_rows(case_run)] == [
        verdict.baselines[0].triage.line, verdict.baselines[1].triage.line]
    text = evidence.evidence(run_dir, "demo")
    assert "Baseline `ref` (cpu): mismatch, environment drift: not bitwise from step 2 (loss)" in text
    assert "Baseline `other` (cpu): mismatch, numerics changed: loss beyond tolerance at step 3 (rel 1.0e-03)" in text
    # A verdict written before triage reads, and says what it has.
    for b in data["baselines"]:
        del b["triage"]
    records.write_json(path, data)
    old = read_verdict(path)
    assert old.baselines[0].triage is ABSENT and old.baselines[0].message in format_verdict(old)


# ---- unused and lint -----------------------------------------------------------------------

def test_unused_baselines(runs):
    case, run_dir, root = runs
    assert unused_baselines(root, [case]) == []
    gone_setup = root / "demo" / "hsdp.cuda-h100.csv"
    gone_case = root / "old" / "ref.cpu.csv"
    for p in (gone_setup, gone_case):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes((root / "demo" / "ref.cpu.csv").read_bytes())
    assert unused_baselines(root, [case]) == [gone_setup, gone_case]
    assert unused_baselines(root, [make_case(("ref", "other", "hsdp"))]) == [gone_case]


def test_lint_clean(runs):
    assert lint(runs[2]) == []


def lint_one(tmp_path, metric_rows, provenance=None):
    path = tmp_path / "b" / "c" / "s.cpu.csv"
    prov = provenance if provenance is not None else {k: "x" for k in PROVENANCE} | {"platform": "cpu"}
    write_baseline(path, metric_rows, prov)
    return path, lint(tmp_path / "b")


def test_lint_nan_and_inf(tmp_path):
    path, problems = lint_one(tmp_path, rows(loss=[LOSS[0], math.nan, *LOSS[2:]], gnorm=[*GNORM[:4], math.inf]))
    first_row = len(PROVENANCE) + 2
    assert f"{path}:{first_row + 1}: loss is nan" in problems
    assert f"{path}:{first_row + 4}: grad_norm is inf" in problems


def test_lint_steps_must_increase(tmp_path):
    bad = rows()
    bad[3]["step"] = 3
    path, problems = lint_one(tmp_path, bad)
    assert problems == [f"{path}:{len(PROVENANCE) + 5}: step 3 does not increase (after 3)"]


def test_lint_missing_provenance(tmp_path):
    path, problems = lint_one(tmp_path, rows(), {"torch": TORCH, "platform": "cpu"})
    assert len(problems) == 1 and problems[0].startswith(f"{path}:1: missing provenance: device, cpu_capability, world_size")


def test_lint_platform_must_match_file_name(tmp_path):
    path, problems = lint_one(tmp_path, rows(), {k: "x" for k in PROVENANCE} | {"platform": "cuda-h100"})
    assert problems == [f"{path}:1: provenance platform 'cuda-h100' but the file name says 'cpu'"]


def test_lint_rounded_values(tmp_path):
    path, problems = lint_one(tmp_path, rows(loss=[round(x, 5) for x in LOSS]))
    assert len(problems) == 1 and "loss looks rounded" in problems[0] and problems[0].startswith(f"{path}:")
    # Short binary fractions among full-precision values are fine (a loss can be exactly 7.5).
    _, problems = lint_one(tmp_path, rows(loss=[7.5, 7.25] + LOSS[2:]))
    assert problems == []
    # One value rounded to 5 decimals among full-precision ones is caught, on its own line.
    path, problems = lint_one(tmp_path, rows(loss=LOSS[:3] + [round(LOSS[3], 5)] + LOSS[4:]))
    first_row = len(PROVENANCE) + 2
    assert len(problems) == 1 and problems[0].startswith(f"{path}:{first_row + 3}: loss {round(LOSS[3], 5)!r} has only")


def test_lint_unparseable(tmp_path):
    path = tmp_path / "b" / "c" / "s.cpu.csv"
    path.parent.mkdir(parents=True)
    path.write_text("# torch: 2\nstep,loss,grad_norm,lr,tokens\n1,2.5,1.5\n")
    assert lint(tmp_path / "b") == [f"{path}:3: 3 fields, expected 5 (step,loss,grad_norm,lr,tokens)"]
