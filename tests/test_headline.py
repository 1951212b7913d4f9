"""A pair's headline: the one first divergence a reader sees, in causal order across probes, step metrics and
weights (no torch, milliseconds)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from parity.case.schema import Case, Expect, Setup, Tolerance, Train
from parity.verdict.headline import headline
from parity.verdict.localize import localize
from parity.verdict.model import StatisticalTest
from parity.verdict.numbers import entry, ulps_text
from parity.verdict.series import compare_series, compare_weights, not_compared

TOL = {"loss": Tolerance(1e-5, 0.0), "grad_norm": Tolerance(1e-4, 0.0), "weights": Tolerance(1e-4, 0.0),
       "forward": Tolerance(5e-5, 0.0), "backward": Tolerance(2e-4, 0.0), "update": Tolerance(1e-4, 0.0)}
STEPS = [1, 2, 3]
LOSS, GNORM = [8.0, 7.5, 7.0], [0.5, 0.4, 0.3]
PROBES = [("forward", "layers.0"), ("backward", "layers.0.w"), ("update", "layers.0.w")]


def case(mode="tolerance", outcome="match", **expect) -> Case:
    setups = (Setup(name="ref", train=Train()), Setup(name="other", train=Train()))
    return Case(name="c", path=Path("cases/c.toml"), description="d", setups=setups, sha256="0" * 64,
                expect=Expect(mode=mode, outcome=outcome, tolerance=TOL, **expect))


def probes(change=None) -> list[dict]:
    rows = []
    for step in STEPS:
        for k, (phase, name) in enumerate(PROBES):
            value = 1.0 + k / 7 + step / 3
            rows.append({"step": step, "phase": phase, "name": name, "stat": "sumsq",
                         "value": change(step, phase, value) if change else value})
    return rows


def weights(scale=1.0) -> list[dict]:
    return [{"param": "layers.0.w", "norm": 2.0 * scale, "sha256": "a" if scale == 1.0 else "b"}]


def told(c: Case, loss=LOSS, gnorm=GNORM, w=1.0, change=None, problems=()):
    """The headline of ref against an other run with these values (the reference's are LOSS, GNORM, weights(),
    probes())."""
    lane = "bitwise" if c.expect.mode == "bitwise" else "tolerance"
    metrics = {"loss": compare_series(STEPS, LOSS, STEPS, loss, TOL["loss"], lane, unit="f32"),
               "grad_norm": compare_series(STEPS, GNORM, STEPS, gnorm, TOL["grad_norm"], lane, unit="f32"),
               "weights": compare_weights(weights(), weights(w), TOL["weights"], lane, unit="f32")}
    modes = {name: c.expect.mode for name in metrics}
    loc = localize(probes(), probes(change), lane, TOL, unit="f32")
    return headline(c, metrics, modes, loc, loc.first_not_bitwise, list(problems))


def test_a_gradient_bug_is_named_at_its_gradient_not_at_the_weights_it_later_moved():
    h = told(case(), w=1.01, change=lambda step, phase, v: v * 4 if (step, phase) >= (1, "backward") and
             phase != "forward" else v)
    assert (h.lane, h.basis, h.entry["step"], h.entry["phase"]) == ("probes", "beyond tolerance", 1, "backward")
    assert h.text == "first beyond tolerance: step 1, backward, layers.0.w (rel 3.0)"


@pytest.mark.parametrize("loss_step, probe_phase, expected", [
    (2, "forward", "probes"),  # the forward pass of a step comes before its loss
    (2, "backward", "loss"),  # its gradients after
    (1, "update", "loss"),
])
def test_within_a_step_forward_then_loss_then_backward_then_grad_norm_then_update(loss_step, probe_phase, expected):
    loss = [v * (1.001 if s == loss_step else 1.0) for s, v in zip(STEPS, LOSS)]
    h = told(case(), loss=loss, change=lambda step, phase, v: v * 1.01 if (step, phase) == (2, probe_phase) else v)
    assert h.lane == expected


def test_grad_norm_comes_after_the_backward_probes_of_its_step():
    gnorm = [GNORM[0], GNORM[1] * 1.01, GNORM[2]]
    h = told(case(), gnorm=gnorm, change=lambda step, phase, v: v * 1.01 if (step, phase) == (2, "backward") else v)
    assert (h.lane, h.entry["phase"]) == ("probes", "backward")
    h = told(case(), gnorm=gnorm, change=lambda step, phase, v: v * 1.01 if (step, phase) == (2, "update") else v)
    assert (h.lane, h.entry["step"]) == ("grad_norm", 2)


def test_weights_come_after_every_step_and_lead_only_when_nothing_else_fails():
    h = told(case(), w=1.01)
    assert h.lane == "weights" and h.text.startswith("first beyond tolerance: weights, param layers.0.w (rel 0.01")


def test_first_not_bitwise_and_first_beyond_tolerance_are_two_things():
    up = float(np.nextafter(np.float32(LOSS[0]), np.float32(9)))  # one float32 ulp: within 1e-5
    h = told(case(), loss=[up, *LOSS[1:]], gnorm=[GNORM[0], GNORM[1] * 1.01, GNORM[2]])
    assert h.basis == "beyond tolerance" and (h.lane, h.entry["step"]) == ("grad_norm", 2)
    assert (h.not_bitwise_lane, h.not_bitwise["step"]) == ("loss", 1)
    h = told(case(), loss=[up, *LOSS[1:]])
    assert h.lane is None and h.basis is None
    assert h.text == "nothing beyond tolerance; first not bitwise: loss at step 1 (rel 1.2e-07, 1 f32 ulp)"
    assert told(case()).text == "bitwise equal: every compared entry"


def test_in_bitwise_mode_the_first_failing_entry_is_the_first_not_bitwise():
    h = told(case("bitwise"), change=lambda step, phase, v: v * (1 + 1e-7) if (step, phase) == (3, "update") else v)
    assert (h.basis, h.lane, h.entry["step"]) == ("not bitwise", "probes", 3)
    assert h.text.startswith("first not bitwise: step 3, update, layers.0.w (rel 1e-07,")


def test_a_control_says_why_it_passed():
    planted = lambda step, phase, v: v * 4 if (step, phase) == (1, "backward") else v  # noqa: E731
    localized = {"step": 1, "phase": "backward", "name": "layers.0.w"}
    h = told(case(outcome="diverge", localized=localized), change=planted)
    assert h.text == "declared effect found: step 1, backward, layers.0.w (rel 3.0)"
    declared = {"metric": "grad_norm", "step": 2, "ratio": 2.0, "within": 1e-6}
    h = told(case(outcome="diverge", first_divergence=declared), gnorm=[GNORM[0], GNORM[1] * 2, GNORM[2] * 2])
    assert h.text == "declared effect found: grad_norm at step 2 (rel 1.0)"
    # A failed control has no reason to give: its problems say what is wrong; the headline says what was seen.
    h = told(case(outcome="diverge", localized=localized), change=planted, problems=["expected ... found ..."])
    assert h.text == "first beyond tolerance: step 1, backward, layers.0.w (rel 3.0)"


def test_in_statistical_mode_the_probes_do_not_lead_and_a_window_does():
    c = case("statistical")
    band = {"step": 50, "window": [26, 50], "value_ref": 3.1002, "value_other": 3.2154, "abs": 0.1152, "rel": 0.0372,
            "z": 41.3, "limit": 7.02}
    loss = replace(compare_series(STEPS, LOSS, STEPS, LOSS, TOL["loss"], "tolerance"), passed=False,
                   statistical=StatisticalTest(False, [1.0], [41.3], 41.3, 1, band))
    metrics = {"loss": loss, "grad_norm": compare_series(STEPS, GNORM, STEPS, GNORM, TOL["grad_norm"])}
    loc = localize(probes(), probes(lambda step, phase, v: v * 2), "tolerance", TOL)
    h = headline(c, metrics, {"loss": "statistical", "grad_norm": "statistical"}, loc, loc.first_not_bitwise,
                 ["loss: 1 of 1 windows outside the ensemble's band"])
    assert h.text == "first outside the band: loss over steps 26-50 (rel 0.037, z 41.3 (limit 7.02))"


def test_a_pair_with_nothing_to_compare_says_why_and_never_agrees():
    c = case()
    metrics = {"loss": not_compared("metrics.csv unreadable"), "grad_norm": not_compared("metrics.csv unreadable"),
               "weights": not_compared("weights.csv unreadable")}
    h = headline(c, metrics, dict.fromkeys(metrics, "tolerance"), None, None, ["other: run failed: rank 1 crashed"])
    assert h.lane is None and h.text == "other: run failed: rank 1 crashed"


def test_ulps_are_counted_in_the_precision_the_values_were_produced_in():
    a = 8.074957191944122  # a float32 run's loss, averaged over ranks in double
    b = float(np.float32(8.074956893920898))
    assert ulps_text(entry("step", 1, a, b)) == "167772160 f64 ulps"  # what a double's ulp says: alarming
    assert ulps_text(entry("step", 1, a, b, "f32")) == "<1 f32 ulp"  # one float32 apart at most
    assert ulps_text(entry("step", 1, 1.0, float(np.nextafter(np.float32(1), np.float32(2))), "f32")) == "1 f32 ulp"
    assert ulps_text(entry("step", 1, 1.0, 1.0, "f32")) == "0 f32 ulps"
