"""The negative controls must be caught for the right reason: a stated metric at a stated step.

The case files declare it (`[expect] first_divergence`), and the verdict fails when the harness
reports a different first divergence. These tests pin what each control declares and prove the
verdict enforces it on hand-made runs; the controls themselves run as `pytest parity` items.
"""

import pytest

from parity import records
from parity.compare import compare_case
from parity.spec import SpecError, load_case

CONTROLS = {
    "control_divide_factor": ("grad_norm", 1),  # summed gradients: 8x grad norm at step 1, loss hidden by clipping
    "control_replicated_data": ("loss", 1),  # every rank reads the same micro-batch
    "control_skip_seed_load": ("loss", 1),  # different initial weights
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_each_control_declares_where_it_must_be_caught(name):
    case = load_case(f"cases/{name}.toml")
    assert case.expect.outcome == "diverge"
    metric, step = CONTROLS[name]
    assert case.expect.first_divergence == {"metric": metric, "step": step}


def _run(out, case, setup, losses, norms):
    d = records.setup_dir(out, case.name, setup)
    records.write_metrics(d / "metrics.csv", [{"step": i + 1, "loss": l, "grad_norm": g, "lr": 1e-3, "tokens": 8,
                                               "step_time_s": 0.1} for i, (l, g) in enumerate(zip(losses, norms))])
    records.write_weights(d / "weights.csv", [{"param": "w", "norm": 1.0, "sha256": "ab"}])
    records.write_json(d / "run.json", {"status": "ok", "device": "cpu", "torch": "x"})


def test_verdict_fails_a_control_caught_for_the_wrong_reason(tmp_path):
    case = load_case("cases/control_divide_factor.toml")
    ref, other = (s.name for s in case.setups)
    _run(tmp_path, case, ref, [8.0, 7.9], [0.37, 0.36])
    _run(tmp_path, case, other, [8.0, 7.9], [2.96, 2.88])  # the planted 8x, at step 1
    assert compare_case(case, tmp_path)["pairs"][0]["passed"]
    _run(tmp_path, case, other, [8.1, 7.9], [2.96, 2.88])  # the loss moved first: a different bug
    pair = compare_case(case, tmp_path)["pairs"][0]
    assert not pair["passed"]
    assert "expected the first divergence on grad_norm at step 1, found it on loss at step 1" in pair["problems"][0]


def test_first_divergence_only_for_negative_controls(write_case):
    text = ('description = "x"\n[setups.a]\ndp_api = "none"\n[setups.b]\ndp_api = "none"\n'
            '[expect]\nfirst_divergence = { metric = "loss", step = 1 }\n')
    with pytest.raises(SpecError, match="expect.first_divergence: only for outcome"):
        load_case(write_case(text))
