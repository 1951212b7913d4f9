"""The negative controls must be caught for the right reason: a stated metric, at a stated step, by a stated amount.

The case files declare it (`[expect] first_divergence`, with the effect's size), and the verdict
fails when the harness reports a different first divergence or an effect of another size. These
tests pin what each control declares and prove the verdict enforces it on hand-made runs; the
controls themselves run as `pytest parity` items.
"""

import pytest

from parity.core import records
from parity.verdict.case_verdict import compare_case
from parity.case.loader import load_case
from parity.case.schema import SpecError

CONTROLS = {
    # summed gradients over 8 ranks: exactly 8x the grad norm at step 1; AdamW hides it from the loss
    "control_divide_factor": {"metric": "grad_norm", "step": 1, "ratio": 8.0, "within": 1e-3},
    # every rank reads the same micro-batch
    "control_replicated_data": {"metric": "loss", "step": 1, "min_rel": 1e-3},
    # different initial weights
    "control_skip_seed_load": {"metric": "loss", "step": 1, "min_rel": 1e-3},
    # each pipeline stage clips by its own norm; AdamW's scale invariance makes it surface late
    "control_pp_local_clip": {"metric": "loss", "step": 6, "min_rel": 1e-5},
}


# Where each control's probes must first part (parity.verdict.localize): the module or parameter the bug touches.
LOCALIZED = {
    "control_divide_factor": {"step": 1, "phase": "backward", "name": "output.weight"},
    "control_replicated_data": {"step": 1, "phase": "forward", "name": "tok_embeddings"},
    "control_skip_seed_load": {"step": 1, "phase": "forward", "name": "tok_embeddings"},
    "control_scale_output": {"step": 1, "phase": "forward", "name": "layers.3.feed_forward"},
    "control_scale_grad": {"step": 1, "phase": "backward", "name": "layers.2.attention.wq.weight"},
}


# Statistical mode's controls: the window (its last step) they must leave the ensemble's band in, and by how much.
STATISTICAL_CONTROLS = {
    "control_statistical_lr": {"metric": "loss", "step": 25, "min_rel": 5e-4},  # lr x1.1
    "control_statistical_no_warmup": {"metric": "loss", "step": 25, "min_rel": 0.03},
    # every gradient x the 512 tokens of a step: the pre-clip grad norm shows the factor itself
    "control_statistical_grad_x_tokens": {"metric": "grad_norm", "step": 25, "ratio": 512.0, "within": 0.01},
}


@pytest.mark.parametrize("name", list(STATISTICAL_CONTROLS))
def test_each_statistical_control_declares_its_window_and_shares_the_ensemble(name):
    case = load_case(f"cases/{name}.toml")
    null = load_case("cases/statistical_single_vs_fsdp2.toml")
    assert (case.expect.mode, case.expect.outcome) == ("statistical", "diverge")
    assert case.expect.first_divergence == STATISTICAL_CONTROLS[name]
    # the same reference and members as the case a correct layout must pass: one ensemble, trained once
    assert case.ensemble == null.ensemble and case.expect.statistical == null.expect.statistical


GRADS, DATA = ("backward", "output.weight"), ("forward", "tok_embeddings")


@pytest.mark.parametrize("name", list(CONTROLS))
def test_each_control_declares_where_and_how_much(name):
    case = load_case(f"cases/{name}.toml")
    assert case.expect.outcome == "diverge" and case.expect.mode == "tolerance"
    assert case.expect.first_divergence == CONTROLS[name]


@pytest.mark.parametrize("name", list(LOCALIZED))
def test_each_localizing_control_declares_where_its_probes_part(name):
    case = load_case(f"cases/{name}.toml")
    assert case.expect.outcome == "diverge" and case.expect.localized == LOCALIZED[name]


def _run(out, case, setup, losses, norms, moved=None):
    """A hand-made finished run; `moved`: the probe (phase, name) whose step-1 value the planted bug changes."""
    d = records.setup_dir(out, case.name, setup)
    probes = [("forward", "tok_embeddings"), ("backward", "output.weight")]
    records.write_probes(d / "probes.csv", [{"step": 1, "phase": phase, "name": name, "stat": "sumsq",
                                             "value": 2.0 if (phase, name) == moved else 1.0}
                                            for phase, name in probes])
    records.write_metrics(d / "metrics.csv", [{"step": i + 1, "loss": l, "grad_norm": g, "lr": 1e-3, "tokens": 8,
                                               "step_time_s": 0.1} for i, (l, g) in enumerate(zip(losses, norms))])
    records.write_weights(d / "weights.csv", [{"param": "w", "norm": 1.0, "sha256": "ab"}])
    records.write_json(d / "run.json", {"status": "ok", "device": "cpu", "torch": "x"})


def test_verdict_fails_a_control_caught_for_the_wrong_reason(tmp_path):
    case = load_case("cases/control_divide_factor.toml")
    ref, other = (s.name for s in case.setups)
    _run(tmp_path, case, ref, [8.0, 7.9], [0.37, 0.36])
    _run(tmp_path, case, other, [8.0, 7.9], [2.96, 2.88], GRADS)  # the planted 8x, at step 1
    assert compare_case(case, tmp_path).pairs[0].passed
    _run(tmp_path, case, other, [8.1, 7.9], [2.96, 2.88], GRADS)  # the loss moved first: a different bug
    pair = compare_case(case, tmp_path).pairs[0]
    assert not pair.passed
    assert "expected the first divergence on grad_norm at step 1, found it on loss at step 1" in pair.problems[0]


def test_verdict_fails_a_control_caught_by_the_wrong_amount(tmp_path):
    case = load_case("cases/control_divide_factor.toml")
    ref, other = (s.name for s in case.setups)
    _run(tmp_path, case, ref, [8.0, 7.9], [0.37, 0.36])
    _run(tmp_path, case, other, [8.0, 7.9], [0.37 * 4, 2.88], GRADS)  # caught where declared, but 4x, not 8x
    pair = compare_case(case, tmp_path).pairs[0]
    assert not pair.passed and pair.effect["ratio"] == pytest.approx(4.0)
    assert "expected grad_norm at step 1 to be x8.0 the reference (within 0.001), found x4" in pair.problems[0]


def test_verdict_fails_a_control_caught_by_a_last_bit_difference(tmp_path):
    case = load_case("cases/control_replicated_data.toml")
    ref, other = (s.name for s in case.setups)
    _run(tmp_path, case, ref, [8.0, 7.9], [0.37, 0.36])
    _run(tmp_path, case, other, [8.0 * (1 + 1e-4), 7.9], [0.37, 0.36], DATA)  # beyond tolerance, far below the effect
    pair = compare_case(case, tmp_path).pairs[0]
    assert not pair.passed
    assert "expected loss at step 1 to differ by at least 0.001 relative, found 0.0001" in pair.problems[0]
    _run(tmp_path, case, other, [8.0 * 1.01, 7.9], [0.37, 0.36], DATA)
    assert compare_case(case, tmp_path).pairs[0].passed
    _run(tmp_path, case, other, [8.0 * 1.01, 7.9], [0.37, 0.36], GRADS)  # the right size, the wrong place
    pair = compare_case(case, tmp_path).pairs[0]
    assert not pair.passed and "expected the divergence localized at step 1, forward, tok_embeddings; found step 1, " \
        "backward, output.weight" in pair.problems[0]


def test_an_effect_must_be_stated(write_case):
    text = ('description = "x"\n[setups.a]\ndp_api = "none"\n[setups.b]\ndp_api = "none"\n'
            '[expect]\noutcome = "diverge"\nfirst_divergence = { metric = "loss", step = 1 }\n')
    with pytest.raises(SpecError, match="state the expected effect with exactly one of ratio, min_rel"):
        load_case(write_case(text))


def test_first_divergence_only_for_negative_controls(write_case):
    text = ('description = "x"\n[setups.a]\ndp_api = "none"\n[setups.b]\ndp_api = "none"\n'
            '[expect]\nfirst_divergence = { metric = "loss", step = 1, min_rel = 1e-3 }\n')
    with pytest.raises(SpecError, match="expect.first_divergence: only for outcome"):
        load_case(write_case(text))
