"""The comparison engine on hand-made series and run directories (no torch, milliseconds)."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from parity.core import records
from parity.core.records import RecordError
from parity.verdict.case_verdict import compare_case, write_verdict
from parity.verdict.formatting import divergence_table, format_verdict
from parity.verdict.numbers import ulp_unit, ulps_apart
from parity.verdict.series import compare_series, compare_weights
from parity.case.schema import Case, Expect, Setup, Tolerance, Train
from parity.verdict.model import BaselineCheck, MetricResult, Verdict

EXACT = Tolerance(rtol=0.0, atol=0.0)
LOOSE = Tolerance(rtol=1e-5, atol=0.0)
LOSS = [7.6246337890625123, 7.5123456789012345, 7.3987654321098765, 7.2811111111111111]
GNORM = [3.1415926535897931, 2.7182818284590451, 1.4142135623730951, 1.7320508075688772]


def up(x: float, n: int = 1) -> float:
    for _ in range(n):
        x = float(np.nextafter(x, math.inf))
    return x


def f32_up(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(math.inf)))


def series(values, other, tol=LOOSE, mode="tolerance"):
    steps = list(range(1, len(values) + 1))
    return compare_series(steps, values, list(range(1, len(other) + 1)), other, tol, mode)


# ---- ULPs ----------------------------------------------------------------------------------

def test_ulps_apart_in_the_values_own_precision():
    # float32 numbers (a grad norm widened to double) count float32 ULPs
    assert ulps_apart(1.0, 1.0) == 0 and ulp_unit(1.0, f32_up(1.0)) == "f32"
    assert ulps_apart(1.0, f32_up(1.0)) == 1
    assert ulps_apart(f32_up(1.0), 1.0) == 1
    tiny = float(np.float32(1e-45))  # smallest float32 subnormal
    assert ulps_apart(-tiny, tiny) == 2  # across zero, counting -0/+0 once
    assert ulps_apart(-0.0, 0.0) == 0
    # a double that is no float32 number (a loss averaged in float64) counts float64 ULPs: never "0 ulps"
    assert ulp_unit(1.0, up(1.0)) == "f64" and ulps_apart(1.0, up(1.0)) == 1
    assert ulps_apart(8.074956953525543, 8.074957191944122) == 134217728  # 2.4e-7 apart; 0 in float32 units
    assert ulps_apart(1e300, 1.0) > 0
    assert ulps_apart(math.nan, 1.0) is None
    assert ulps_apart(1.0, math.inf) is None
    assert ulps_apart(1e300, 1.0, "f32") is None  # overflows float32


# ---- step series ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bitwise", "tolerance"])
def test_equal_series_pass(mode):
    m = series(LOSS, list(LOSS), mode=mode)
    assert m.passed and m.bitwise and m.within_tolerance
    assert (m.n, m.exact_equal_steps, m.failing_steps) == (4, 4, 0)
    assert m.first_not_bitwise is None and m.first_beyond_tolerance is None
    assert m.max_abs == 0.0 and m.max_rel == 0.0 and m.problems == []


def test_one_float32_ulp_apart():
    ref = [float(np.float32(v)) for v in LOSS]
    other = list(ref)
    other[2] = f32_up(ref[2])
    bitwise = series(ref, other, mode="bitwise")
    tolerance = series(ref, other, mode="tolerance")
    assert not bitwise.passed and tolerance.passed
    assert bitwise.exact_equal_steps == 3
    d = bitwise.first_not_bitwise
    assert (d["step"], d["ulps"], d["value_ref"], d["value_other"]) == (3, 1, ref[2], other[2])
    assert d["abs"] == other[2] - ref[2] and d["rel"] == d["abs"] / ref[2]
    assert tolerance.first_beyond_tolerance is None and tolerance.failing_steps == 0


def test_one_double_ulp_is_not_bitwise_equal():
    m = series(LOSS, [LOSS[0], up(LOSS[1]), LOSS[2], LOSS[3]], EXACT, "bitwise")
    assert not m.bitwise and m.first_not_bitwise["step"] == 2


def test_negative_zero_is_not_bitwise_equal():
    m = series([0.0, 1.5], [-0.0, 1.5], LOOSE, "bitwise")
    assert not m.bitwise and m.within_tolerance and m.first_not_bitwise["step"] == 1


@pytest.mark.parametrize("ref,other", [
    ([1.5, math.nan], [1.5, 2.0]),
    ([1.5, 2.0], [1.5, math.nan]),
    ([1.5, math.nan], [1.5, math.nan]),  # NaN vs NaN, even the same bits, never passes
])
@pytest.mark.parametrize("mode", ["bitwise", "tolerance"])
def test_nan_never_passes(ref, other, mode):
    m = series(ref, other, Tolerance(rtol=1e9, atol=1e9), mode)
    assert not m.passed and not m.bitwise and not m.within_tolerance
    assert any("non-finite" in p and "2 (nan)" in p for p in m.problems)
    assert m.exact_equal_steps == 1 and m.failing_steps == 1


@pytest.mark.parametrize("other", [[1.5, math.inf], [1.5, -math.inf]])
def test_inf_never_passes(other):
    for ref in ([1.5, 2.0], list(other)):  # inf vs inf too
        m = series(ref, other, Tolerance(rtol=1e9, atol=1e9))
        assert not m.passed and any("inf" in p for p in m.problems)


def test_length_mismatch():
    m = series(LOSS, LOSS[:3], EXACT, "bitwise")
    assert not m.passed and not m.bitwise and not m.within_tolerance
    assert m.problems == ["other lacks steps 4 that reference has"]
    assert m.exact_equal_steps == 3  # the common steps are still reported
    m = series(LOSS[:3], LOSS)
    assert not m.passed and m.problems == ["other has steps 4 that reference lacks"]


def test_misaligned_duplicate_and_unordered_steps():
    m = compare_series([1, 2, 3], LOSS[:3], [1, 2, 4], LOSS[:3], LOOSE)
    assert not m.passed and len(m.problems) == 2
    m = compare_series([1, 2, 3], LOSS[:3], [1, 3, 2], [LOSS[0], LOSS[2], LOSS[1]], LOOSE)
    assert not m.passed and "out of order" in m.problems[0]
    m = compare_series([1, 2, 3], LOSS[:3], [1, 2, 2, 3], [LOSS[0], LOSS[1], LOSS[1], LOSS[2]], LOOSE)
    assert not m.passed and "twice" in m.problems[0]
    m = compare_series([], [], [], [], LOOSE)
    assert not m.passed and m.problems == ["nothing to compare"]


@pytest.mark.parametrize("tol,ref,at_bound", [
    (Tolerance(rtol=0.0, atol=0.5), 1.0, 1.5),      # atol only
    (Tolerance(rtol=0.25, atol=0.0), 2.0, 2.5),     # rtol only, scaled by the reference
    (Tolerance(rtol=0.25, atol=0.5), 2.0, 3.0),     # both: 0.5 + 0.25 * 2
    (Tolerance(rtol=0.0, atol=0.5), 2.0, 1.5),      # below the reference
])
def test_tolerance_edges(tol, ref, at_bound):
    ok = series([ref], [at_bound], tol)
    assert ok.passed and ok.failing_steps == 0 and not ok.bitwise
    past = float(np.nextafter(at_bound, math.inf if at_bound > ref else -math.inf))
    bad = series([ref], [past], tol)
    assert not bad.passed and bad.failing_steps == 1
    assert bad.first_beyond_tolerance["value_other"] == past


def test_rtol_uses_reference_not_other():
    # |2.5 - 2| = 0.5 = 0.25 * |2| passes; swapped, 0.25 * |2.5| = 0.625 would also pass, so use a
    # bound that only the reference satisfies.
    tol = Tolerance(rtol=0.2, atol=0.0)
    assert not series([2.0], [2.5], tol).passed  # 0.5 > 0.4
    assert series([2.5], [2.0], tol).passed  # 0.5 <= 0.5


# ---- weights -------------------------------------------------------------------------------

def weights(shas=("a" * 64, "b" * 64), norms=(12.345678901234567, 0.98765432109876543)):
    return [{"param": f"layers.{i}.w", "norm": n, "sha256": s} for i, (n, s) in enumerate(zip(norms, shas))]


def test_weights_equal_and_sha_mismatch():
    assert compare_weights(weights(), weights(), EXACT, "bitwise").passed
    other = weights(shas=("a" * 64, "c" * 64))
    m = compare_weights(weights(), other, EXACT, "bitwise")
    assert not m.passed and m.exact_equal_steps == 1
    assert m.first_not_bitwise["param"] == "layers.1.w" and m.first_not_bitwise["abs"] == 0.0
    assert compare_weights(weights(), other, EXACT, "tolerance").passed  # same norms


def test_weights_missing_param_and_norm_tolerance():
    m = compare_weights(weights(), weights()[:1], LOOSE)
    assert not m.passed and m.problems == ["other lacks params layers.1.w"]
    far = weights(norms=(12.345678901234567, 0.99))
    m = compare_weights(weights(), far, LOOSE)
    assert not m.passed and m.first_beyond_tolerance["param"] == "layers.1.w"


# ---- cases and run directories -------------------------------------------------------------

def make_case(mode="bitwise", outcome="match", names=("ref", "other"), tol=None) -> Case:
    tol = tol or {"loss": LOOSE, "grad_norm": Tolerance(1e-4, 0.0), "weights": Tolerance(1e-4, 0.0)}
    setups = tuple(Setup(name=n, train=Train()) for n in names)
    expect = Expect(mode=mode, outcome=outcome, tolerance=tol, tolerance_source={m: "default for float32" for m in tol})
    return Case(name="demo", path=Path("cases/demo.toml"), description="d", setups=setups, expect=expect, sha256="0" * 64)


def write_run(out: Path, setup: str, loss=LOSS, gnorm=GNORM, w=None, status="ok", case="demo"):
    d = out / case / setup
    records.write_metrics(d / "metrics.csv", [
        {"step": i + 1, "loss": l, "grad_norm": g, "lr": 8e-4, "tokens": 2048, "step_time_s": 0.5}
        for i, (l, g) in enumerate(zip(loss, gnorm))])
    records.write_weights(d / "weights.csv", w if w is not None else weights())
    records.write_json(d / "run.json", {"case": case, "setup": setup, "status": status, "platform": "cpu",
                                        "device": "cpu", "backend": "gloo", "torch": "2.13.0"})


def test_case_match_bitwise_pass(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other")
    v = compare_case(make_case(), tmp_path)
    assert v.passed and v.problems == []
    pair = v.pairs[0]
    assert (pair.reference, pair.other, pair.passed, pair.diverged) == ("ref", "other", True, None)
    assert set(pair.metrics) == {"loss", "grad_norm", "weights"}
    assert v.tolerance["loss"] == {"rtol": 1e-5, "atol": 0.0, "source": "default for float32"}
    assert v.platform == "cpu" and v.reference == "ref"


def test_case_match_bitwise_fails_at_step(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other", loss=[LOSS[0], LOSS[1], up(LOSS[2]), LOSS[3]])
    v = compare_case(make_case(), tmp_path)
    assert not v.passed
    pair = v.pairs[0]
    assert pair.diverged["metric"] == "loss" and pair.diverged["step"] == 3
    assert any("loss: 1 of 4 steps differ bitwise; first at step 3" in p for p in v.problems)
    table = divergence_table(v)
    assert repr(LOSS[2]) in table and repr(up(LOSS[2])) in table and "loss" in table
    # The same runs pass in tolerance mode.
    assert compare_case(make_case(mode="tolerance"), tmp_path).passed


def test_diverge_mode(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "same")
    write_run(tmp_path, "far", loss=[LOSS[0], LOSS[1] * 1.01, LOSS[2] * 1.01, LOSS[3] * 1.01])
    v = compare_case(make_case(mode="tolerance", outcome="diverge", names=("ref", "far")), tmp_path)
    assert v.passed
    d = v.pairs[0].diverged
    assert (d["metric"], d["step"], d["param"]) == ("loss", 2, None)
    assert d["value_other"] == LOSS[1] * 1.01
    v = compare_case(make_case(mode="tolerance", outcome="diverge", names=("ref", "same")), tmp_path)
    assert not v.passed and v.pairs[0].diverged is None
    assert "expected a divergence" in v.problems[0]


def test_diverge_grad_norm_first_at_step_1(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other", loss=[LOSS[0]] + [x * 1.01 for x in LOSS[1:]], gnorm=[GNORM[0] * 2] + GNORM[1:])
    v = compare_case(make_case(mode="bitwise", outcome="diverge"), tmp_path)
    assert v.passed
    d = v.pairs[0].diverged
    assert (d["metric"], d["step"]) == ("grad_norm", 1)


def test_diverge_tie_prefers_loss_and_weights_last(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "tie", loss=[up(LOSS[0])] + LOSS[1:], gnorm=[up(GNORM[0])] + GNORM[1:])
    write_run(tmp_path, "w", w=weights(shas=("a" * 64, "d" * 64)))
    v = compare_case(make_case(outcome="diverge", names=("ref", "tie", "w")), tmp_path)
    assert v.passed
    tie, w = v.pairs
    assert (tie.diverged["metric"], tie.diverged["step"]) == ("loss", 1)
    assert (w.diverged["metric"], w.diverged["step"], w.diverged["param"]) == ("weights", None, "layers.1.w")


@pytest.mark.parametrize("outcome", ["match", "diverge"])
@pytest.mark.parametrize("bad", ["failed", "timeout"])
def test_failed_run_never_passes(tmp_path, outcome, bad):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other", loss=[x * 2 for x in LOSS], status=bad)
    v = compare_case(make_case(outcome=outcome), tmp_path)
    assert not v.passed and not v.pairs[0].passed
    assert f"other: run status is {bad!r}" in v.pairs[0].problems


def test_failed_reference_fails_every_pair(tmp_path):
    write_run(tmp_path, "ref", status="failed")
    write_run(tmp_path, "a")
    write_run(tmp_path, "b")
    v = compare_case(make_case(names=("ref", "a", "b")), tmp_path)
    assert not v.passed and not any(p.passed for p in v.pairs)


@pytest.mark.parametrize("outcome", ["match", "diverge"])
def test_missing_files_are_bad_input_naming_the_file(tmp_path, outcome):
    # A run that says it finished but lacks a record is not what `parity run` writes: exit 2, not a verdict.
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other")
    (tmp_path / "demo" / "other" / "weights.csv").unlink()
    with pytest.raises(RecordError, match=r"demo/other/weights.csv: cannot read"):
        compare_case(make_case(outcome=outcome), tmp_path)
    write_run(tmp_path, "gone")
    shutil.rmtree(tmp_path / "demo" / "gone")
    with pytest.raises(RecordError, match=r"demo/gone/run.json"):
        compare_case(make_case(names=("ref", "gone")), tmp_path)


def test_failed_run_is_a_verdict_problem_not_bad_input(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other")
    info = tmp_path / "demo" / "other" / "run.json"
    records.write_json(info, {**records.read_json(info), "status": "timeout", "message": "timed out after 9 s"})
    (tmp_path / "demo" / "other" / "metrics.csv").unlink()
    v = compare_case(make_case(), tmp_path)
    assert not v.passed and any("run status is 'timeout': timed out after 9 s" in p for p in v.problems)


def test_nan_in_run_fails_diverge_mode_too(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other", loss=[LOSS[0], math.nan, LOSS[2], LOSS[3]])
    for outcome in ("match", "diverge"):
        v = compare_case(make_case(outcome=outcome), tmp_path)
        assert not v.passed and any("nan" in p for p in v.problems)


def test_baseline_results_gate_the_case(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other")
    ok = BaselineCheck("ref", None, "cpu", "match", "exact", True, {}, "matches", None)
    bad = BaselineCheck("other", None, "cpu", "missing", "exact", False, {}, "no baseline", None)
    assert compare_case(make_case(), tmp_path, [ok]).passed
    v = compare_case(make_case(), tmp_path, [ok, bad])
    assert not v.passed and v.problems == ["baseline other: no baseline"]


def test_write_verdict_and_summaries(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other", loss=[LOSS[0], math.nan, LOSS[2], LOSS[3]], gnorm=[up(g) for g in GNORM])
    v = compare_case(make_case(), tmp_path)
    path = write_verdict(tmp_path, v)
    assert path == tmp_path / "demo" / "verdict.json"
    back = json.loads(path.read_text())  # standard JSON: NaN written as a string
    assert back["passed"] is False and back["pairs"][0]["metrics"]["grad_norm"]["first_not_bitwise"]["step"] == 1
    assert back["pairs"][0]["metrics"]["grad_norm"]["first_not_bitwise"]["value_other"] == up(GNORM[0])
    text = format_verdict(v)
    assert text.startswith("demo: FAIL on cpu/gloo (mode bitwise, outcome match, reference ref, platform cpu)")
    assert "loss rtol=1e-05 atol=0.0 (default for float32)" in text
    assert "grad_norm  exact 0/4 steps" in text and "nan" in text
    assert "ref vs other: FAIL; first not bitwise: grad_norm at step 1 (rel 1.4e-16, <1 f32 ulp)" in text


def test_a_written_verdict_reads_back_as_the_same_record(tmp_path):
    """verdict.json is Verdict.to_json(); Verdict.from_json gives back the record, and its JSON the same bytes."""
    write_run(tmp_path, "ref")
    write_run(tmp_path, "ref.repeat", loss=[up(x) for x in LOSS])
    write_run(tmp_path, "other", gnorm=[up(g) for g in GNORM])
    v = compare_case(make_case(), tmp_path)
    path = write_verdict(tmp_path, v)
    back = Verdict.from_json(records.read_json(path))
    assert back == v and back.repeat.cause.startswith("nondeterministic reference")
    assert isinstance(back.pairs[0].metrics["loss"], MetricResult)
    assert back.pairs[0].localization == v.pairs[0].localization
    text = path.read_bytes()
    write_verdict(tmp_path, back)
    assert path.read_bytes() == text


def test_verdict_schema(tmp_path):
    """verdict.json is a contract for the plugin, the CLI and the reports: pin its key names."""
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other", loss=[up(x) for x in LOSS])
    v = compare_case(make_case(), tmp_path).to_json()
    assert set(v) == {"case", "passed", "mode", "outcome", "reference", "platform", "device", "backend",
                      "tolerance", "repeat", "statistical", "pairs", "baselines", "problems", "notes"}
    pair = v["pairs"][0]
    assert set(pair) == {"reference", "other", "passed", "problems", "diverged", "effect", "metrics", "modes", "notes",
                         "localization", "headline"}
    assert set(pair["localization"]) == {"probed", "mode", "first", "before", "agree_until", "steps", "problems", "line"}
    assert set(pair["headline"]) == {"text", "lane", "basis", "entry", "not_bitwise_lane", "not_bitwise"}
    assert set(pair["diverged"]) == {"metric", "step", "param", "value_ref", "value_other", "abs", "rel", "ulps",
                                     "ulp_unit"}
    m = pair["metrics"]["loss"]
    assert set(m) == {"n", "exact_equal_steps", "bitwise", "within_tolerance", "max_abs", "max_rel",
                      "failing_steps", "first_not_bitwise", "first_beyond_tolerance", "passed", "problems"}
    assert set(m["first_not_bitwise"]) == {"step", "value_ref", "value_other", "abs", "rel", "ulps", "ulp_unit"}


# ---- repeat check --------------------------------------------------------------------------


def test_repeat_check_passes_when_the_reference_repeats_bit_for_bit(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "ref.repeat")
    write_run(tmp_path, "other")
    v = compare_case(make_case(), tmp_path)
    assert v.passed and v.repeat.passed and v.repeat.cause is None
    assert "repeat check (ref twice, bitwise): PASS" in format_verdict(v)


def test_repeat_check_fails_first_with_nondeterministic_reference_even_in_a_tolerance_case(tmp_path):
    """One ULP in the repeat's grad norm at step 3: caught there, before any pair is judged."""
    write_run(tmp_path, "ref")
    write_run(tmp_path, "ref.repeat", gnorm=GNORM[:2] + [up(GNORM[2])] + GNORM[3:])
    write_run(tmp_path, "other")
    case = make_case()
    case = replace(case, expect=replace(case.expect, mode="tolerance"))
    v = compare_case(case, tmp_path)
    assert not v.passed and v.pairs[0].passed
    assert v.problems[0].startswith("nondeterministic reference: ref run twice in one launch differs first at "
                                       "step 3 on grad_norm")
    assert "FAIL: nondeterministic reference" in format_verdict(v)


def test_repeat_run_that_failed_is_a_repeat_check_problem(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "ref.repeat", status="timeout")
    write_run(tmp_path, "other")
    v = compare_case(make_case(), tmp_path)
    assert not v.passed and v.problems[0].startswith("repeat check: ref.repeat: run status is 'timeout'")


def test_no_repeat_directory_means_no_repeat_check(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other")
    assert compare_case(make_case(), tmp_path).repeat is None


def test_runs_from_another_version_of_the_case_file_are_named(tmp_path):
    write_run(tmp_path, "ref")
    write_run(tmp_path, "other")
    case = make_case()
    assert "do not record their case file's sha256" in compare_case(case, tmp_path).notes[0]
    for name in ("ref", "other"):
        info = tmp_path / "demo" / name / "run.json"
        records.write_json(info, {**records.read_json(info), "case_sha256": "f" * 64})
    v = compare_case(case, tmp_path)
    assert v.passed and "made from another version of cases/demo.toml (case sha256 ffffffffffff" in v.notes[0]
    assert "note: the runs were made from another version" in format_verdict(v)
    for name in ("ref", "other"):
        info = tmp_path / "demo" / name / "run.json"
        records.write_json(info, {**records.read_json(info), "case_sha256": case.sha256})
    assert compare_case(case, tmp_path).notes == []


def test_rounding_slack_is_per_step():
    """A %g-style log prints 2.5 at one step and 0.123457 at another: the coarse step's half-unit
    (0.05) must not widen the fine step's allowance (5e-7)."""
    slack = {1: 0.05, 2: 5e-07}
    m = compare_series([1, 2], [2.5, 0.123457], [1, 2], [2.54, 0.1236], Tolerance(0.0, 0.0), "tolerance", slack=slack)
    assert not m.passed and m.failing_steps == 1 and m.first_beyond_tolerance["step"] == 2
    ok = compare_series([1, 2], [2.5, 0.123457], [1, 2], [2.54, 0.1234573], Tolerance(0.0, 0.0), "tolerance",
                        slack=slack)
    assert ok.passed and ok.exact_equal_steps == 0


# ---- long series: whole columns, the same verdict as a short hand-checked one -----------------

SHORT_REF = [2.5, 2.25, 2.0, 1.75, 1.5]
SHORT_OTHER = [2.5, up(2.25), 2.0 * (1 + 2e-5), 1.75, 1.5]  # 1 ulp at step 2, beyond rtol 1e-5 at step 3


def test_short_series_hand_checked():
    m = compare_series([1, 2, 3, 4, 5], SHORT_REF, [1, 2, 3, 4, 5], SHORT_OTHER, LOOSE, "tolerance")
    assert (m.n, m.exact_equal_steps, m.failing_steps, m.passed, m.bitwise) == (5, 3, 1, False, False)
    assert m.first_not_bitwise == {"step": 2, "value_ref": 2.25, "value_other": up(2.25), "abs": up(2.25) - 2.25,
                                     "rel": (up(2.25) - 2.25) / 2.25, "ulps": 1, "ulp_unit": "f64"}
    assert m.first_beyond_tolerance["step"] == 3 and m.first_beyond_tolerance["value_other"] == 2.0 * (1 + 2e-5)
    assert m.max_abs == 2.0 * (1 + 2e-5) - 2.0 and m.max_rel == (2.0 * (1 + 2e-5) - 2.0) / 2.0


def _long(at: int, n: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n steps of a decreasing series, equal in both runs except the short example placed at steps at..at+4."""
    steps = np.arange(1, n + 1)
    ref = 3.0 + np.exp(-steps / 1e4)
    ref[at - 1:at + 4] = SHORT_REF
    other = ref.copy()
    other[at - 1:at + 4] = SHORT_OTHER
    return steps, ref, other


def test_a_long_series_gets_the_short_examples_verdict():
    short = compare_series([1, 2, 3, 4, 5], SHORT_REF, [1, 2, 3, 4, 5], SHORT_OTHER, LOOSE, "tolerance")
    steps, ref, other = _long(at=70_001)
    m = compare_series(steps, ref, steps, other, LOOSE, "tolerance")
    assert m.n == 100_000 and m.exact_equal_steps == 100_000 - 5 + short.exact_equal_steps
    assert m.first_not_bitwise == {**short.first_not_bitwise, "step": 70_002}
    assert m.first_beyond_tolerance == {**short.first_beyond_tolerance, "step": 70_003}
    for key in ("failing_steps", "max_abs", "max_rel", "passed", "bitwise", "within_tolerance", "problems"):
        assert getattr(m, key) == getattr(short, key), key
    assert all(type(getattr(m, k)) in (int, float, bool) for k in ("n", "exact_equal_steps", "max_abs", "failing_steps"))
    json.dumps(m.to_json(), allow_nan=False)  # plain Python numbers, as verdict.json needs them


def test_a_long_series_with_nan_gaps_and_rounding():
    steps, ref, other = _long(at=50_001)
    other[80_000] = math.nan  # step 80001
    m = compare_series(steps, ref, np.delete(steps, 99_998), np.delete(other, 99_998), LOOSE, "tolerance")
    assert not m.passed and m.problems == ["other has non-finite values at step 80001 (nan)",
                                                 "other lacks steps 99999 that reference has"]
    assert m.n == 99_999 and m.failing_steps == 2  # step 50003 beyond tolerance, the NaN never within it
    assert m.first_beyond_tolerance["step"] == 50_003
    # Rounding slack (values read from printed text) widens each step's allowance by its own amount only.
    slack = {50_003: 2e-5 * 2.0}
    m = compare_series(steps, ref, steps, _long(at=50_001)[2], LOOSE, "tolerance", slack=slack)
    assert m.passed and m.failing_steps == 0 and m.exact_equal_steps == 100_000 - 2


def test_duplicated_and_disordered_steps_are_named_as_before():
    steps = np.arange(1, 10_001)
    values = np.ones(10_000)
    m = compare_series(np.r_[steps, 5], np.r_[values, 1.0], steps, values, EXACT, "bitwise")
    assert m.problems == ["reference has step 5 twice"] and not m.passed
    m = compare_series(np.r_[steps[:3], 2_000, steps[3:5]], np.ones(6), steps[:5], np.ones(5), EXACT, "bitwise")
    assert m.problems[0] == "reference steps are out of order: 4 after 2000"
