"""calibrate: errors against the float64 oracle and the proposed tolerances, on hand-made runs."""

from dataclasses import replace

import pytest

from parity.core import records
from parity.calibrate import ORACLE, errors_against_oracle, oracle_setup, propose
from parity.case.loader import load_case

CASE = """
description = "x"
[train]
model = "tiny"
[setups.a]
dp_api = "replicate"
dp_replicate = 2
param_dtype = "bfloat16"
[setups.b]
dp_api = "fully_shard"
dp_shard = 2
"""


def _write(out, case, setup, losses, norms, weight_norm):
    d = records.setup_dir(out, case, setup)
    records.write_metrics(d / "metrics.csv", [{"step": i + 1, "loss": l, "grad_norm": g, "lr": 1e-3, "tokens": 1,
                                               "step_time_s": 0.0} for i, (l, g) in enumerate(zip(losses, norms))])
    records.write_weights(d / "weights.csv", [{"param": "w", "norm": weight_norm, "sha256": "x"}])
    records.write_json(d / "run.json", {"status": "ok"})


def test_oracle_is_the_reference_in_float64_without_mixed_precision(write_case):
    case = load_case(write_case(CASE))
    oracle = oracle_setup(case)
    assert oracle.name == ORACLE and oracle.train.dtype == "float64"
    assert (oracle.dp_api, oracle.dp_replicate, oracle.param_dtype) == ("replicate", 2, None)


def test_errors_and_proposal(write_case, tmp_path):
    case = load_case(write_case(CASE))
    calib = replace(case, setups=(oracle_setup(case),) + case.setups)
    _write(tmp_path, case.name, ORACLE, [8.0, 4.0], [1.0, 2.0], 10.0)
    _write(tmp_path, case.name, "a", [8.0 * (1 + 1e-6), 4.0], [1.0, 2.0 * (1 - 3e-5)], 10.0)
    _write(tmp_path, case.name, "b", [8.0, 4.0 * (1 + 2e-6)], [1.0, 2.0], 10.0 * (1 + 1e-7))
    errors = errors_against_oracle(tmp_path, calib)
    assert set(errors) == {"a", "b"}
    assert errors["a"]["loss"] == pytest.approx(1e-6) and errors["b"]["loss"] == pytest.approx(2e-6)
    assert errors["a"]["grad_norm"] == pytest.approx(3e-5) and errors["b"]["weights"] == pytest.approx(1e-7)
    proposal = propose(errors, multiple=3.0, floor=1e-6)
    assert proposal["loss"] == pytest.approx(6e-6)
    assert proposal["grad_norm"] == pytest.approx(9e-5)
    assert proposal["weights"] == 1e-6  # 3e-7 is below the floor
