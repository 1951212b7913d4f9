"""Localization on hand-made probes.csv files: where two runs' probes first part (no torch, milliseconds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from parity import cli

from parity.core import records

from parity.report import heatmap, pages
from parity.verdict.case_verdict import compare_case
from parity.verdict.formatting import divergence_table, format_verdict
from parity.verdict.localize import largest, localize, matrix
from parity.case.schema import DEFAULT_TOLERANCES, SpecError, Tolerance
from parity.trainers import load_case

LAYERS = 2
STEPS = (1, 2, 3)
MODULES = ["tok_embeddings"] + [f"layers.{i}.{m}" for i in range(LAYERS) for m in ("attention", "feed_forward", "")]
MODULES = [m.rstrip(".") for m in MODULES] + ["norm", "output"]
PARAMS = ["tok_embeddings.weight"] + [f"layers.{i}.{p}.weight" for i in range(LAYERS)
                                      for p in ("attention.wq", "attention.wo", "feed_forward.w1")] + ["norm.weight",
                                                                                                     "output.weight"]
# float32 tolerances as spec.DEFAULT_TOLERANCES has them: forward tighter than backward, backward than update
TOL = {"forward": Tolerance(1e-5, 0.0), "backward": Tolerance(1e-4, 0.0), "update": Tolerance(1e-3, 0.0)}


def probes(steps=STEPS, change=None) -> list[dict]:
    """Rows in causal order, as a built-in setup writes them; `change(step, phase, name, value)` edits a value."""
    rows = []
    for step in steps:
        order = ([("forward", m) for m in MODULES] + [("backward", p) for p in reversed(PARAMS)]
                 + [("update", p) for p in PARAMS])
        for k, (phase, name) in enumerate(order):
            value = 1.0 + k / 7 + step / 3  # distinct, not round: every bit counts
            value = change(step, phase, name, value) if change else value
            rows.append({"step": step, "phase": phase, "name": name, "stat": "sumsq", "value": value})
    return rows


def up(x: float, n: int = 1) -> float:
    for _ in range(n):
        x = float(np.nextafter(x, math.inf))
    return x


def at(entry: tuple, f):
    """A change (see probes) that applies f to one entry's value, (step, phase, name)."""
    return lambda step, phase, name, value: f(value) if (step, phase, name) == entry else value


def where(e: dict) -> tuple:
    return e["step"], e["phase"], e["name"]


def from_step_2_forward_ffn1(step, phase, name, value):
    """A difference that starts at step 2 in layers.1.feed_forward and spreads to everything after it."""
    from_ffn1 = phase != "forward" or MODULES.index(name) >= MODULES.index("layers.1.feed_forward")
    after = step > 2 or (step == 2 and from_ffn1)
    return value * (1 + 1e-3) if after else value


def test_bitwise_first_difference_in_forward_at_step_2_with_what_agrees_before_it():
    loc = localize(probes(), probes(change=from_step_2_forward_ffn1), "bitwise", TOL, ("ref", "tp"))
    assert loc.probed and loc.problems == [] and loc.steps == [1, 2, 3]
    assert where(loc.first) == (2, "forward", "layers.1.feed_forward")
    assert [where(e) for e in loc.before] == [(2, "forward", "layers.0.feed_forward"), (2, "forward", "layers.0"),
                                                 (2, "forward", "layers.1.attention")]
    assert all(e["value_ref"] == e["value_other"] and e["rel"] == 0.0 for e in loc.before)
    assert loc.first["rel"] == pytest.approx(1e-3)
    assert loc.line == ("first not bitwise: step 2, forward, layers.1.feed_forward (rel 1.0e-03); "
                           "everything before it equal")
    assert loc.agree_until == "everything before it equal"


def test_one_ulp_is_found_bitwise_and_passes_tolerance():
    ulp = at((1, "backward", "norm.weight"), up)
    assert where(localize(probes(), probes(change=ulp), "bitwise", TOL).first) == (1, "backward", "norm.weight")
    loc = localize(probes(), probes(change=ulp), "tolerance", TOL)
    assert loc.first is None and loc.line == "probes agree (within tolerance)"
    assert localize(probes(), probes(), "bitwise", TOL).line == "probes agree (bitwise)"


def test_tolerance_mode_applies_each_phase_its_own_tolerance():
    def change(step, phase, name, v):
        if step == 1 and phase == "backward":
            return v * (1 + 5e-5)  # within backward's 1e-4, beyond forward's 1e-5
        if step == 1 and phase == "update":
            return v * (1 + 5e-4)  # within update's 1e-3
        if step == 2 and phase == "forward" and name == "layers.0.attention":
            return v * (1 + 2e-5)  # beyond forward's 1e-5
        return v

    loc = localize(probes(), probes(change=change), "tolerance", TOL)
    assert where(loc.first) == (2, "forward", "layers.0.attention")
    assert loc.line.endswith("; everything before it within tolerance")
    assert where(localize(probes(), probes(change=change), "bitwise", TOL).first) == (1, "backward", "output.weight")
    tighter = {**TOL, "backward": Tolerance(1e-5, 0.0)}
    assert where(localize(probes(), probes(change=change), "tolerance", tighter).first) == (1, "backward",
                                                                                              "output.weight")
    atol = {**TOL, "forward": Tolerance(0.0, 1.0)}  # |a - b| <= atol + rtol * |ref|: a large atol admits it
    assert localize(probes(), probes(change=change), "tolerance", atol).first is None


def test_a_difference_only_in_the_last_update_of_the_last_step():
    last = at((3, "update", "output.weight"), lambda v: v * 1.5)
    loc = localize(probes(), probes(change=last), "bitwise", TOL)
    assert where(loc.first) == (3, "update", "output.weight")
    assert [e["name"] for e in loc.before] == [PARAMS[-4],
                                                  PARAMS[-3], PARAMS[-2]]
    assert all(e["phase"] == "update" and e["step"] == 3 for e in loc.before)
    assert loc.first["rel"] == pytest.approx(0.5)


def test_missing_extra_and_duplicated_entries_and_other_steps_are_problems_never_skipped():
    ref = probes()
    other = [r for r in probes() if (r["step"], r["name"]) != (2, "layers.0.attention")]
    loc = localize(ref, other, "bitwise", TOL, ("ref", "pp"))
    assert loc.first is None and loc.line == "probes agree (bitwise)"
    assert loc.problems == ["pp lacks probes step 2, forward, layers.0.attention that ref has"]
    extra = probes() + [{"step": 1, "phase": "forward", "name": "layers.9", "stat": "sumsq", "value": 1.0}]
    assert localize(ref, extra, "bitwise", TOL, ("ref", "pp")).problems == [
        "pp has probes step 1, forward, layers.9 that ref lacks"]
    twice = probes() + probes()[:1]
    assert localize(ref, twice, "bitwise", TOL, ("ref", "pp")).problems == [
        "pp has probes twice: step 1, forward, tok_embeddings"]
    loc = localize(ref, probes(steps=(1, 2)), "bitwise", TOL, ("ref", "pp"))
    assert loc.problems == ["pp probed steps 1, 2, ref probed steps 1, 2, 3"]
    assert localize(ref, None, "bitwise", TOL, ("ref", "titan")).line == "no probes recorded by titan"


@pytest.mark.parametrize("mode", ["bitwise", "tolerance"])
def test_nan_never_agrees_not_even_with_nan(mode):
    nan = at((1, "forward", "norm"), lambda v: math.nan)
    loc = localize(probes(change=nan), probes(change=nan), mode, TOL, ("ref", "other"))
    assert where(loc.first) == (1, "forward", "norm") and math.isnan(loc.first["rel"])
    assert loc.problems == ["non-finite probes: step 1, forward, norm in ref, step 1, forward, norm in other"]
    assert "(rel nan)" in loc.line


def test_matrix_marks_exact_differing_and_missing_cells():
    other = [r for r in probes(change=from_step_2_forward_ffn1) if (r["step"], r["name"]) != (3, "norm")]
    m = matrix(probes(), other)
    assert m["steps"] == [1, 2, 3] and m["rows"][0] == ("forward", "tok_embeddings", "sumsq")
    assert len(m["rows"]) == len(MODULES) + 2 * len(PARAMS) and m["rel"].shape == (len(m["rows"]), 3)
    assert m["exact"][:, 0].all() and (m["rel"][:, 0] == 0.0).all()  # step 1 equal everywhere
    i = m["rows"].index(("forward", "layers.1.feed_forward", "sumsq"))
    assert m["exact"][:i, 1].all() and not m["exact"][i, 1] and m["rel"][i, 1] == pytest.approx(1e-3)
    gone = m["rows"].index(("forward", "norm", "sumsq"))
    assert math.isnan(m["rel"][gone, 2]) and not m["exact"][gone, 2]
    top = largest(probes(), probes(change=from_step_2_forward_ffn1), 2, n=3)
    assert len(top) == 3 and all(e["rel"] == pytest.approx(1e-3) and not e["agrees"] for e in top)
    # In tolerance mode `agree` says which differences are beyond their phase's tolerance: here the update's
    # 1e-3 admits a 1e-3 difference (up to rounding), forward's and backward's do not.
    m = matrix(probes(), probes(change=from_step_2_forward_ffn1), "tolerance", {**TOL, "update": Tolerance(2e-3, 0)})
    phases = np.array([r[0] for r in m["rows"]])
    assert m["agree"][:, 0].all() and m["agree"][phases == "update", 2].all()
    assert not m["agree"][phases == "backward", 2].any()


# ---- the verdict, the CLI and the heatmap on a run directory --------------------------------

CASE = """\
description = "two single-rank setups whose probes must agree"
[train]
model = "tiny"
steps = 3
[setups.ref]
dp_api = "none"
[setups.tp]
dp_api = "none"
{extra}
"""
LOSS = [5.5451774444795623, 5.4012345678901234, 5.2987654321098765]
GNORM = [1.4142135623730951, 1.7320508075688772, 2.2360679774997898]
WEIGHTS = [{"param": p, "norm": 1.0 + k / 9, "sha256": f"{k:064x}"} for k, p in enumerate(PARAMS)]


def write_run(out: Path, case: str, setup: str, loss=LOSS, rows=None):
    d = records.setup_dir(out, case, setup)
    records.write_metrics(d / "metrics.csv", [{"step": i + 1, "loss": v, "grad_norm": g, "lr": 1e-3, "tokens": 64,
                                               "step_time_s": 0.1} for i, (v, g) in enumerate(zip(loss, GNORM))])
    records.write_weights(d / "weights.csv", WEIGHTS)
    if rows is not None:
        records.write_probes(d / "probes.csv", rows)
    records.write_json(d / "run.json", {"case": case, "setup": setup, "status": "ok", "platform": "cpu",
                                        "device": "cpu", "backend": "gloo", "torch": "2.13.0", "world_size": 1})


def control(tmp_path, write_case, localized: str, tp_probes=None):
    """A negative control whose tp setup diverges on the loss from step 2 and in its probes from step 2."""
    extra = f'[expect]\noutcome = "diverge"\nlocalized = {localized}\n'
    case = load_case(write_case(CASE.format(extra=extra), "ctl"))
    out = tmp_path / "run"
    write_run(out, "ctl", "ref", rows=probes())
    write_run(out, "ctl", "tp", loss=[LOSS[0]] + [x * 1.01 for x in LOSS[1:]],
              rows=probes(change=from_step_2_forward_ffn1) if tp_probes is None else tp_probes)
    return case, out


def test_expected_localization_holds_or_fails_the_control_with_one_line(tmp_path, write_case):
    case, out = control(tmp_path, write_case, '{ step = 2, phase = "forward", name = "layers.1.feed_forward" }')
    v = compare_case(case, out)
    assert v.passed, v.problems
    assert where(v.pairs[0].localization.first) == (2, "forward", "layers.1.feed_forward")
    assert "    probes: first not bitwise: step 2, forward, layers.1.feed_forward (rel 1.0e-03)" in format_verdict(v)
    case, out = control(tmp_path, write_case, '{ step = 1, phase = "forward", name = "layers.1.feed_forward" }')
    v = compare_case(case, out)
    assert not v.passed
    assert v.pairs[0].problems == ["expected the divergence localized at step 1, forward, layers.1.feed_forward; "
                                         "found step 2, forward, layers.1.feed_forward (rel 0.001)"]
    case, out = control(tmp_path, write_case, '{ step = 2, phase = "forward", name = "layers.1.feed_forward" }',
                        tp_probes=probes())
    assert compare_case(case, out).pairs[0].problems == [
        "expected the divergence localized at step 2, forward, layers.1.feed_forward; found no divergence "
        "(probes agree (bitwise))"]


def test_match_case_probes_are_a_checked_lane(tmp_path, write_case):
    case = load_case(write_case(CASE.format(extra=""), "pair"))
    out = tmp_path / "run"
    write_run(out, "pair", "ref", rows=probes())
    write_run(out, "pair", "tp", rows=probes(change=from_step_2_forward_ffn1))
    v = compare_case(case, out)  # loss, grad norm and weights bitwise equal; the probes are not
    assert not v.passed and v.pairs[0].problems == [
        "probes: first not bitwise: step 2, forward, layers.1.feed_forward (rel 1.0e-03); everything before it equal"]
    text = format_verdict(v)
    # named in the pair's headline and as its problem, not a third time as its localization line
    assert text.count("first not bitwise: step 2, forward, layers.1.feed_forward") == 2
    assert "  ref vs tp: FAIL; first not bitwise: step 2, forward, layers.1.feed_forward (rel 0.001" in text
    assert "    - probes: first not bitwise: step 2, forward, layers.1.feed_forward" in text
    assert "tolerance: loss rtol=1e-05" in text and "forward rtol=5e-05 atol=0.0 (default for float32)" in text
    assert "first not bitwise: step 2, forward, layers.1.feed_forward" in divergence_table(v)
    # Within tolerance the same runs pass: 1e-3 is beyond forward's default, so widen it in the case.
    tol = '[expect]\nmode = "tolerance"\n[expect.tolerance]\nforward = { rtol = 2e-3 }\nbackward = { rtol = 2e-3 }\n' \
          'update = { rtol = 2e-3 }\n'
    loose = load_case(write_case(CASE.format(extra=tol), "pair"))
    assert loose.expect.tolerance_source["forward"] == "case" and loose.expect.tolerance["forward"].rtol == 2e-3
    assert compare_case(loose, out).passed
    # A setup without probes (another trainer) is said, not failed.
    (out / "pair" / "tp" / "probes.csv").unlink()
    v = compare_case(case, out)
    assert v.passed and v.pairs[0].localization.line == "no probes recorded by tp"


def test_a_failing_pair_names_the_probe_divergence_in_the_pytest_message(tmp_path, write_case):
    case = load_case(write_case(CASE.format(extra=""), "pair"))
    out = tmp_path / "run"
    write_run(out, "pair", "ref", rows=probes())
    write_run(out, "pair", "tp", loss=[LOSS[0], up(LOSS[1]), LOSS[2]], rows=probes(change=from_step_2_forward_ffn1))
    table = divergence_table(compare_case(case, out))  # the loss fails first; the probes say where to look
    assert "ref vs tp: first not bitwise: step 2, forward, layers.1.feed_forward (rel 0.001, 9987 f32 ulps)" in table


@pytest.mark.parametrize("bad, key", [
    ('{ step = 0, phase = "forward", name = "x" }', "expect.localized.step"),
    ('{ step = 4, phase = "forward", name = "x" }', "expect.localized.step"),
    ('{ step = 1, phase = "sideways", name = "x" }', "expect.localized.phase"),
    ('{ step = 1, phase = "forward", name = "" }', "expect.localized.name"),
    ('{ step = 1, phase = "forward", name = "x", layer = 3 }', "expect.localized.layer"),
    ('"layers.3"', "expect.localized"),
])
def test_localized_is_validated_with_one_line_naming_the_key(write_case, bad, key):
    with pytest.raises(SpecError, match=rf": {key}: ") as e:
        load_case(write_case(CASE.format(extra=f'[expect]\noutcome = "diverge"\nlocalized = {bad}\n')))
    assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match=r"expect.localized: only for outcome = \"diverge\""):
        load_case(write_case(CASE.format(extra='[expect]\nlocalized = { step = 1, phase = "forward", name = "x" }\n')))


def test_localized_needs_setups_that_record_probes(write_case):
    body = CASE.replace('[setups.tp]\ndp_api = "none"', '[setups.tp]\ntrainer = "command"\nworld_size = 1\n'
                        'argv = ["{{python}}", "train.py", "{{output_dir}}"]\nmetrics = {{ reader = "jsonl" }}')  # format()ed
    extra = '[expect]\noutcome = "diverge"\nlocalized = { step = 1, phase = "forward", name = "norm" }\n'
    with pytest.raises(SpecError, match=r"expect.localized: needs probes, which only built-in setups record; "
                                        r"setup tp is trainer = \"command\""):
        load_case(write_case(body.format(extra=extra)))


def test_locate_prints_the_line_the_entries_before_it_and_the_largest(tmp_path, write_case, capsys):
    case, out = control(tmp_path, write_case, '{ step = 2, phase = "forward", name = "layers.1.feed_forward" }')
    assert cli.main(["locate", str(out), str(case.path), "--top", "4"]) == 0
    text = capsys.readouterr().out
    print(text)
    assert "ctl: ref vs tp (mode bitwise; probed steps 1, 2, 3)" in text
    assert ("  first not bitwise: step 2, forward, layers.1.feed_forward (rel 1.0e-03); everything before it equal"
            in text)
    assert "layers.1.attention" in text and "<- first" in text and "largest relative differences at step 2:" in text
    # bad input: one line, exit 2
    assert cli.main(["locate", str(tmp_path / "nowhere"), str(case.path)]) == 2
    assert cli.main(["locate", str(tmp_path), str(case.path)]) == 2
    (out / "ctl" / "tp" / "probes.csv").write_text("step,phase,name,stat,value\n1,sideways,x,sumsq,1.0\n")
    assert cli.main(["locate", str(out), str(case.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "phase 'sideways'" in err


def test_heatmap_is_written_beside_the_case_figure_and_in_the_report(tmp_path, write_case):
    three = CASE.replace("{extra}", '[setups.pp]\ndp_api = "none"\n{extra}').format(extra="")
    case = load_case(write_case(three, "hm"))
    out = tmp_path / "run"
    write_run(out, "hm", "ref", rows=probes())
    write_run(out, "hm", "tp", rows=probes(change=from_step_2_forward_ffn1))
    def late(step, phase, name, v):  # 3 ulps everywhere at step 3, NaN in one entry of it, one entry of step 2 gone
        return math.nan if (step, name) == (3, "norm") else up(v, 3) if step == 3 else v

    write_run(out, "hm", "pp", rows=[r for r in probes(change=late) if (r["step"], r["name"]) != (2, "output")])
    from parity.verdict.case_verdict import write_verdict

    write_verdict(out, compare_case(case, out))
    view = heatmap.plot_probes(out, "hm")
    assert view.png == out / "hm" / "hm-probes.png" and view.png.stat().st_size > 10_000 and view.svg.is_file()
    md, page = pages.write_report(out)
    text = md.read_text()
    assert "![hm probes](hm/hm-probes.png)" in text
    # 27 rows are more than the heatmap shows: every row is a second file, linked, not embedded.
    assert "[Every probe row](hm/hm-probes-full.png)" in text and (out / "hm" / "hm-probes-full.png").is_file()
    assert '<a href="hm/hm-probes-full.png">Every probe row</a>' in page.read_text()
    assert "first not bitwise: step 2, forward, layers.1.feed_forward" in text
    assert ("tp: first not bitwise: step 2, forward, layers.1.feed_forward (rel 0.001, 9987 f32 ulps); "
            "pp: first not bitwise: step 3, forward, tok_embeddings") in text
    assert "(before it: forward layers.0.feed_forward exact, forward layers.0 exact" in text
    assert 'alt="hm probes heatmap"' in page.read_text()
    # Probes bitwise equal everywhere: no heatmap, the sentence where it would be.
    for s in ("tp", "pp"):
        records.write_probes(out / "hm" / s / "probes.csv", probes())
    write_verdict(out, compare_case(case, out))
    md, page = pages.write_report(out)
    sentence = "Probes: all 27 probes bitwise equal over probed steps 1–3 (tp and pp against ref: 81 entries each)"
    assert f"_{sentence}; no heatmap drawn._" in md.read_text() and "hm-probes" not in md.read_text()
    assert f"<p><em>{sentence}; no heatmap drawn.</em></p>" in page.read_text()
    # No probes, no heatmap.
    for s in ("ref", "tp", "pp"):
        (out / "hm" / s / "probes.csv").unlink()
    assert heatmap.plot_probes(out, "hm") is None


def test_a_nondeterministic_reference_is_localized_by_its_repeat(tmp_path, write_case):
    case = load_case(write_case(CASE.format(extra=""), "pair"))
    out = tmp_path / "run"
    write_run(out, "pair", "ref", rows=probes())
    write_run(out, "pair", "ref.repeat", rows=probes(change=from_step_2_forward_ffn1))
    write_run(out, "pair", "tp", rows=probes())
    v = compare_case(case, out)
    assert not v.passed and v.problems == [
        "repeat check: probes: first not bitwise: step 2, forward, layers.1.feed_forward (rel 1.0e-03); "
        "everything before it equal"]


def test_probe_tolerances_default_per_dtype_and_reach_the_verdict(tmp_path, write_case):
    case = load_case(write_case(CASE.format(extra='[expect]\nmode = "tolerance"\n[expect.tolerance]\n'
                                                  'update = { rtol = 1e-2, atol = 1e-9 }\n'), "pair"))
    tol, source = case.expect.tolerance, case.expect.tolerance_source
    fp32 = DEFAULT_TOLERANCES["float32"]
    assert [tol[p].rtol for p in ("forward", "backward", "update")] == [fp32["forward"][0], fp32["backward"][0], 1e-2]
    assert tol["update"].atol == 1e-9
    assert source["forward"] == "default for float32" and source["update"] == "case"
    assert tol["loss"].rtol == 1e-5 and source["loss"] == "default for float32"  # the metrics' keys unchanged
    out = tmp_path / "run"
    write_run(out, "pair", "ref", rows=probes())
    write_run(out, "pair", "tp", rows=probes())
    v = compare_case(case, out)
    assert v.passed and v.tolerance["update"] == {"rtol": 1e-2, "atol": 1e-9, "source": "case"}
    with pytest.raises(SpecError, match=r"expect.tolerance.sideways: unknown key; allowed: backward, forward, "
                                        r"grad_norm, loss, update, weights"):
        load_case(write_case(CASE.format(extra='[expect]\n[expect.tolerance]\nsideways = { rtol = 1e-2 }\n')))


def test_locate_in_tolerance_mode_marks_what_is_beyond_tolerance(tmp_path, write_case, capsys):
    case = load_case(write_case(CASE.format(extra='[expect]\nmode = "tolerance"\n[expect.tolerance]\n'
                                                  'update = { rtol = 2e-3 }\n'), "tol"))
    out = tmp_path / "run"
    write_run(out, "tol", "ref", rows=probes())
    write_run(out, "tol", "tp", rows=probes(change=from_step_2_forward_ffn1))
    assert cli.main(["locate", str(out), str(case.path), "--top", "30"]) == 0
    text = capsys.readouterr().out
    assert "everything before it within tolerance" in text
    worst = text.split("largest relative differences at step 2:")[1].splitlines()[2:]
    assert {("beyond tolerance" in line) for line in worst if " update " in line} == {False}
    assert {("beyond tolerance" in line) for line in worst if " backward " in line} == {True}
