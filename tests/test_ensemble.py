"""Statistical mode on hand-made series (no torch, well under a second): the t quantiles, the windows,
the band and its floor, the error rate of the test under its null, and verdicts from run directories."""

import math
from dataclasses import replace

import numpy as np
import pytest

from parity.verdict import ensemble
from parity.verdict.case_verdict import compare_case
from parity.verdict.formatting import divergence_table, format_verdict
from parity.verdict.ensemble import Band, limit, t_cdf, t_quantile, window_ends, window_values
from parity.case.schema import Statistical, Tolerance
from test_compare import make_case, write_run

FLOOR = {"loss": Tolerance(1e-5, 0.0), "grad_norm": Tolerance(1e-4, 0.0)}


@pytest.mark.parametrize("p, df, want", [  # published Student t quantiles
    (0.975, 1, 12.7062), (0.975, 2, 4.30265), (0.995, 3, 5.84091), (0.975, 7, 2.36462), (0.999, 5, 5.89343),
    (0.975, 30, 2.04227)])
def test_t_quantiles(p, df, want):
    assert t_quantile(p, df) == pytest.approx(want, abs=5e-5)
    assert t_cdf(-want, df) == pytest.approx(1 - p, abs=1e-6)


def test_limit_is_bonferroni_over_the_tests():
    # 8 members, 24 windows x 2 metrics at alpha 0.01: the quantile at 1 - 0.01 / 96 of t with 7 df
    assert limit(8, 0.01, 48) == pytest.approx(7.0173, abs=1e-3)
    assert limit(8, 0.01, 48) > limit(8, 0.01, 2) > limit(16, 0.01, 2)


def test_windows_keep_a_short_last_one_and_nan_spoils_only_its_own():
    steps = np.arange(1, 11)
    assert window_ends(steps, 4).tolist() == [4, 8, 10]
    assert window_ends(steps, 5).tolist() == [5, 10]
    assert window_values(np.arange(1.0, 11.0), 4, "loss").tolist() == [2.5, 6.5, 9.5]
    values = np.arange(1.0, 11.0)
    values[5] = math.nan
    got = window_values(values, 4, "loss")
    assert got[0] == 2.5 and math.isnan(got[1]) and got[2] == 9.5
    # a grad norm window is a mean of logs (the geometric mean, shown back in the metric's units)
    g = window_values(np.array([1.0, 4.0]), 2, "grad_norm")
    assert ensemble.shown(g, "grad_norm")[0] == pytest.approx(2.0)


def test_the_tolerance_floors_the_spread():
    identical = np.full((8, 3), 2.0)
    band = Band(identical, "loss", Tolerance(1e-5, 0.0))
    assert band.at_floor.all() and band.sd_used == pytest.approx(2e-5)
    lim = limit(8, 0.01, 3)
    inside = ensemble.test(np.full(3, 2.0 + 2e-5), band, np.array([5, 10, 15]), lim)
    assert inside.passed and inside.first_failure is None
    out = ensemble.test(np.array([2.0, 2.0 + 2e-5 * 1.06 * lim * 1.01, 2.0]), band, np.array([5, 10, 15]), lim)
    first = out.first_failure
    assert not out.passed and (first["step"], first["window"]) == (10, [6, 10])
    assert abs(first["z"]) > lim and first["limit"] == lim


def test_nan_never_passes():
    band = Band(np.random.default_rng(0).normal(2.0, 1e-3, (8, 3)), "loss", Tolerance(1e-5, 0.0))
    t = ensemble.test(np.array([2.0, math.nan, 2.0]), band, np.array([1, 2, 3]), limit(8, 0.01, 3))
    assert not t.passed and t.first_failure["step"] == 2


@pytest.mark.parametrize("k, tests", [(8, 1), (8, 20), (4, 1)])
def test_false_alarm_rate_under_the_null_is_alpha(k, tests):
    """A candidate drawn from the members' own population fails with probability alpha (one window) or at
    most alpha (Bonferroni over independent windows): the prediction interval is exact for normal draws."""
    rng = np.random.default_rng(1234)
    trials, alpha = 20000, 0.05
    members = rng.normal(3.0, 0.01, (k, trials * tests))  # each column a window of its own trial
    candidate = rng.normal(3.0, 0.01, trials * tests)
    band = Band(members, "loss", Tolerance(0.0, 0.0))  # no floor: the members' spread alone
    z = band.z(candidate).reshape(trials, tests)
    rate = float((np.abs(z) > limit(k, alpha, tests)).any(axis=1).mean())
    sigma = math.sqrt(alpha * (1 - alpha) / trials)
    assert rate == pytest.approx(alpha, abs=4 * sigma) if tests == 1 else alpha - 0.01 < rate <= alpha + 4 * sigma


# ---- verdicts from run directories ---------------------------------------------------------------

STEPS = 40
ST = Statistical(members=6, window=10)


def statistical_case(outcome="match", names=("ref", "other"), **expect):
    case = make_case("tolerance", outcome, names)
    return replace(case, expect=replace(case.expect, mode="statistical", statistical=ST, **expect))


def drifting(seed: int, scale=1e-3, shift=0.0, gain=1.0):
    """A run that drifts from a common curve as a chaotic trajectory does: noise growing with the step."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, STEPS + 1)
    loss = 5.0 - steps * 0.05 + scale * steps / STEPS * rng.normal(size=STEPS) + shift * (steps > 20)
    gnorm = gain * (1.0 + 0.1 * np.sin(steps) + scale * steps / STEPS * rng.normal(size=STEPS))
    return loss.tolist(), gnorm.tolist()


def write_ensemble(out, case, runs: dict):
    for m in case.ensemble:
        write_run(out, m.name, *drifting(100 + int(m.name[-2:])))
    for name, (loss, gnorm) in runs.items():
        write_run(out, name, loss, gnorm)


def test_member_names_and_what_they_change():
    case = statistical_case()
    names = [m.name for m in case.ensemble]
    assert names == [f"ref.member{i:02d}" for i in range(1, 7)]
    assert [m.perturb for m in case.ensemble] == list(range(1, 7))
    data = replace(case, expect=replace(case.expect, statistical=replace(ST, perturb="data")))
    assert [m.train.seed for m in data.ensemble] == [42 + 1000 + i for i in range(1, 7)]
    assert all(m.perturb is None for m in data.ensemble)
    assert make_case().ensemble == ()


def test_a_drifted_setup_inside_the_band_passes(tmp_path):
    case = statistical_case()
    write_ensemble(tmp_path, case, {"ref": drifting(1), "other": drifting(2)})
    v = compare_case(case, tmp_path)
    assert v.passed, v.problems
    p = v.pairs[0]
    assert not p.metrics["loss"].within_tolerance  # a per-step tolerance would have failed it
    assert p.metrics["loss"].passed and p.metrics["weights"].passed
    st = v.statistical
    assert st["k"] == 6 and st["window_ends"] == [10, 20, 30, 40] and st["tests"] == 8
    assert all(t.passed for t in st["reference"].values())
    assert len(st["held_out"]) == 6
    text = format_verdict(v)
    assert "ensemble: 6 members (weights perturbed), windows of 10 steps" in text
    assert "held-out members (each against the other 5)" in text


def test_a_shift_fails_at_its_window_by_its_size(tmp_path):
    case = statistical_case()
    write_ensemble(tmp_path, case, {"ref": drifting(1), "other": drifting(2, shift=0.05)})
    v = compare_case(case, tmp_path)
    assert not v.passed
    first = v.pairs[0].metrics["loss"].statistical.first_failure
    assert first["window"] == [21, 30]  # the shift starts at step 21
    assert first["value_other"] - first["value_ref"] == pytest.approx(0.05, rel=0.05)
    assert "loss: 2 of 4 windows outside the ensemble's band; first at steps 21-30" in v.problems[0]
    assert "steps 21-30" in divergence_table(v)


def test_a_control_must_leave_the_band_where_it_says(tmp_path):
    want = {"metric": "grad_norm", "step": 10, "ratio": 512.0, "within": 0.01}
    case = statistical_case("diverge", first_divergence=want)
    write_ensemble(tmp_path, case, {"ref": drifting(1), "other": drifting(1, gain=512.0)})
    v = compare_case(case, tmp_path)
    assert v.passed, v.problems
    assert v.pairs[0].diverged["metric"] == "grad_norm" and v.pairs[0].effect["ratio"] == pytest.approx(512, rel=1e-3)
    # the same control caught by less than it plants fails: the right reason, by the right amount
    write_run(tmp_path, "other", *drifting(1, gain=2.0))
    v = compare_case(case, tmp_path)
    assert not v.passed and "to be x512.0 the reference" in v.problems[0]
    # and one that stays inside the band fails as a control
    write_run(tmp_path, "other", *drifting(3))
    v = compare_case(case, tmp_path)
    assert not v.passed and "expected a divergence" in v.problems[0]


def test_a_member_that_failed_leaves_no_band_and_no_pass(tmp_path):
    for outcome in ("match", "diverge"):
        case = statistical_case(outcome)
        write_ensemble(tmp_path, case, {"ref": drifting(1), "other": drifting(2, shift=0.05)})
        write_run(tmp_path, "ref.member03", *drifting(3), status="failed")
        v = compare_case(case, tmp_path)
        assert not v.passed and not v.pairs[0].passed
        assert any("ensemble: ensemble member ref.member03: run status is 'failed'" in p for p in v.problems)


def test_a_member_with_nan_leaves_no_band(tmp_path):
    case = statistical_case()
    write_ensemble(tmp_path, case, {"ref": drifting(1), "other": drifting(2)})
    loss, gnorm = drifting(104)
    loss[7] = math.nan
    write_run(tmp_path, "ref.member04", loss, gnorm)
    v = compare_case(case, tmp_path)
    assert not v.passed and any("ref.member04: loss" in p for p in v.problems)


def test_a_reference_outside_its_own_band_fails_the_case(tmp_path):
    case = statistical_case()
    write_ensemble(tmp_path, case, {"ref": drifting(1, shift=0.05), "other": drifting(1, shift=0.05)})
    v = compare_case(case, tmp_path)
    assert not v.passed
    assert any(p.startswith("the reference ref leaves its own ensemble's band on loss") for p in v.problems)


# ---- case files ------------------------------------------------------------------------------------

CASE = """
description = "long run"
[train]
model = "tiny"
steps = 100
[setups.a]
dp_api = "none"
[setups.b]
dp_api = "fully_shard"
dp_shard = 2
[expect]
mode = "statistical"
"""


def test_statistical_defaults(write_case):
    from parity.case.loader import load_case

    case = load_case(write_case(CASE))
    assert case.expect.statistical == Statistical(members=8, perturb="weights", window=25, alpha=0.01)
    assert [m.name for m in case.ensemble][-1] == "a.member08"


@pytest.mark.parametrize("extra, message", [
    ('[expect.statistical]\nmembers = 3', "expect.statistical.members: 3 is not allowed; allowed: an integer from 4 to 256"),
    ('[expect.statistical]\nwindow = 101', "expect.statistical.window: 101 is not allowed; allowed: an integer from 1 to 100"),
    ('[expect.statistical]\nalpha = 1.5', "expect.statistical.alpha: 1.5 is not allowed; allowed: a number between 0 and 1"),
    ('[expect.statistical]\nperturb = "dropout"', "expect.statistical.perturb: 'dropout' is not allowed; allowed: weights, data"),
    ('[expect.statistical]\nk = 8', "expect.statistical.k: unknown key; allowed: alpha, members, perturb, window"),
    ('outcome = "diverge"\nfirst_divergence = { metric = "loss", step = 30, min_rel = 0.01 }',
     "expect.first_divergence.step: 30 ends no window: statistical mode judges means over windows of 25 steps; "
     "allowed: a multiple of 25, or the last step 100"),
    ('outcome = "diverge"\nlocalized = { step = 1, phase = "forward", name = "output" }',
     "expect.localized: probes part at the first rounding difference"),
])
def test_bad_statistical_keys(write_case, extra, message):
    from parity.case.loader import load_case
    from parity.case.schema import SpecError

    with pytest.raises(SpecError) as e:
        load_case(write_case(CASE + extra))
    assert message in str(e.value) and str(e.value).startswith(str(write_case(CASE + extra)))


def test_statistical_table_needs_the_mode(write_case):
    from parity.case.loader import load_case
    from parity.case.schema import SpecError

    with pytest.raises(SpecError, match="expect.statistical: only for mode = \"statistical\""):
        load_case(write_case(CASE.replace('mode = "statistical"', 'mode = "tolerance"') + "[expect.statistical]\n"))


def test_a_case_file_cannot_set_a_member_number(write_case):
    from parity.case.loader import load_case
    from parity.case.schema import SpecError

    with pytest.raises(SpecError, match="setups.b.perturb: unknown key"):
        load_case(write_case(CASE.replace("dp_shard = 2", "dp_shard = 2\nperturb = 3")))


def test_a_long_runs_step_table_shows_its_first_and_last_steps(tmp_path, monkeypatch):
    from parity import cli
    from parity.cli import step_table

    monkeypatch.setattr(cli, "TABLE_STEPS", 20)  # the 40 steps here are a long run
    case = statistical_case()
    write_ensemble(tmp_path, case, {"ref": drifting(1), "other": drifting(2)})
    lines = step_table(case, tmp_path).splitlines()
    steps = [ln.split()[0] for ln in lines[1:-2]]
    assert steps == [*map(str, range(1, 11)), "...", *map(str, range(36, 41))]
    assert lines[-2] == "(against ref's value at the step: = bitwise equal, ≈ within tolerance, ≠ beyond tolerance)"
    assert lines[-1].startswith("(15 of 40 steps shown; every step is in ") and "demo/ref/metrics.csv" in lines[-1]


def test_cases_with_one_reference_train_one_ensemble_and_stay_in_one_share():
    from types import SimpleNamespace

    from parity.run.plan import plan, shares, summary
    from parity.run.runner import case_jobs
    from parity.trainers import load_cases

    cases = load_cases(["cases"])
    stat = [c for c in cases if c.expect.mode == "statistical"]
    assert len(stat) == 4 and {c.reference for c in stat} == {stat[0].reference}
    seed = SimpleNamespace(path="seed", sha256="a" * 64)
    launches = plan([j for c in stat for j in case_jobs(c, "cpu", seed, repeat=False)])
    trainings = [t for launch in launches for t in launch.trainings]
    # 1 reference + 8 members shared by all four cases, then FSDP 2 and the three controls
    assert len(trainings) == 13 and sum(len(t.jobs) for t in trainings) == 4 * (2 + 8)
    members = [t for t in trainings if t.first.setup.perturb is not None]
    assert len(members) == 8 and all(len(t.jobs) == 4 and t.first.probe_steps == () for t in members)
    assert len({shares(cases, 2)[c.name] for c in stat}) == 1
    first = stat[0].name
    line = summary(launches).splitlines()[1]
    assert (f"{first}/single.member01..08 (8 ensemble members; also for "
            f"{', '.join(sorted(c.name for c in stat[1:]))})") in line and "member02" not in line


# ---- baselines of statistical cases ---------------------------------------------------------------

def test_a_baseline_from_another_instruction_set_is_judged_by_the_ensembles_spread(tmp_path):
    """Over a long run, a baseline made where the bits differ drifts as far as a member does: a per-step
    tolerance would fail it; the ensemble's spread passes it, and still catches a real shift."""
    import test_baselines as tb

    from parity.verdict.baselines import check_case_baselines

    case = statistical_case()
    out, root = tmp_path / "out", tmp_path / "baselines"

    def run(name, series, isa):
        loss, gnorm = series
        tb.write_run(out, name, tb.rows(loss, gnorm), isa=isa)

    for m in case.ensemble:
        run(m.name, drifting(100 + int(m.name[-2:])), "AVX2")
    run("ref", drifting(1), "AVX512")
    run("other", drifting(2), "AVX512")
    assert all(b.passed for b in check_case_baselines(case, out, root, update="new"))
    run("ref", drifting(3), "AVX2")  # the same config where the kernels round otherwise: another draw
    run("other", drifting(2, shift=0.05), "AVX2")  # a real change from step 21 on
    ref, other = check_case_baselines(case, out, root)
    assert ref.basis == "statistical" and ref.passed, ref.message
    assert not ref.metrics["loss"].within_tolerance  # what tolerance mode would have said
    assert "compared as two draws of the ensemble" in ref.message
    assert not other.passed and "other loss steps 21-30: baseline median" in other.message
    # Another platform's baseline that fails is a change, never drift, named by the window that left the spread.
    assert ref.triage is None and (other.triage.kind, other.triage.metric, other.triage.step) == ("changed", "loss", 30)
    assert other.triage.line.startswith("numerics changed: loss outside the ensemble's spread at steps 21-30 (rel ")
    # with an ensemble member that did not finish there is no spread to judge by
    tb.write_run(out, "ref.member02", tb.rows(*drifting(102)), status="failed", isa="AVX2")
    ref, _ = check_case_baselines(case, out, root)
    assert not ref.passed and "the ensemble did not finish" in ref.message
    assert (ref.triage.kind, ref.triage.step, ref.triage.entry) == ("changed", None, None)
    assert ref.triage.line.startswith("not drift: loss could not be judged step for step (the ensemble did not finish")


def test_the_report_draws_the_band_and_lists_the_ensemble(tmp_path):
    from parity.verdict.case_verdict import write_verdict
    from parity.report.model import load_case_run
    from parity.report.pages import write_report

    case = statistical_case("diverge")
    write_ensemble(tmp_path, case, {"ref": drifting(1), "other": drifting(2, shift=0.05)})
    write_verdict(tmp_path, compare_case(case, tmp_path))
    c = load_case_run(tmp_path, "demo")
    assert [s.name for s in c.setups] == ["ref", "other"]  # the members are drawn from the band, not as setups
    md, html = write_report(tmp_path)
    text = md.read_text()
    assert "Ensemble:" in text and "- other: loss max |z|" in text and "2 of 4 windows outside" in text
    png = tmp_path / "demo" / "demo.png"
    assert png.stat().st_size > 10_000 and "<h3>Ensemble</h3>" in html.read_text()


def test_a_zero_tolerance_and_members_equal_to_the_bit_still_judge():
    band = Band(np.full((6, 2), 2.0), "loss", Tolerance(0.0, 0.0))
    lim = limit(6, 0.01, 2)
    same = ensemble.test(np.array([2.0, 2.0]), band, np.array([5, 10]), lim)
    assert same.passed and same.z == [0.0, 0.0]
    moved = ensemble.test(np.array([2.0, float(np.nextafter(2.0, 3.0))]), band, np.array([5, 10]), lim)
    assert not moved.passed and moved.first_failure["window"] == [6, 10] and math.isinf(moved.z[1])
