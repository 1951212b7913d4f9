"""Every setup kind runs real torchrun + gloo ranks for a few steps and agrees with the single-process reference."""

import math
from dataclasses import replace

import pytest

from parity.core import records
from parity.case.loader import load_case
from parity.run.runner import run_case

TINY = """
description = "every setup kind at world size 4 against one process"
[train]
model = "tiny"
steps = 3
global_batch = 8
seq_len = 32
[setups.single]
dp_api = "none"
"""

KINDS = {
    "ddp": 'dp_api = "ddp"\ndp_replicate = 4',
    "replicate": 'dp_api = "replicate"\ndp_replicate = 4',
    "fsdp": 'dp_api = "fully_shard"\ndp_shard = 4',
    "hsdp": 'dp_api = "fully_shard"\ndp_replicate = 2\ndp_shard = 2',
    "fsdp_tp": 'dp_api = "fully_shard"\ndp_shard = 2\ntp = 2',
    "replicate_tp": 'dp_api = "replicate"\ndp_replicate = 2\ntp = 2',
    "pp_gpipe": 'dp_api = "fully_shard"\ndp_shard = 2\npp = 2\npp_schedule = "gpipe"\nmicrobatches = 2',
    "pp_1f1b": 'dp_api = "replicate"\ndp_replicate = 2\npp = 2\npp_schedule = "1f1b"\nmicrobatches = 2',
    "pp_interleaved": 'dp_api = "fully_shard"\ndp_shard = 2\npp = 2\npp_schedule = "interleaved_1f1b"\nmicrobatches = 2',
    "fsdp_bf16": 'dp_api = "fully_shard"\ndp_shard = 4\nparam_dtype = "bfloat16"\nreduce_dtype = "float32"',
}
# fp32 kinds agree with one process to ~1e-6 (measured at 8 CPU ranks); bf16 params to ~1e-2.
RTOL = {"loss": 1e-5, "grad_norm": 1e-4}
RTOL_BF16 = {"loss": 2e-2, "grad_norm": 1e-1}


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory, seed_cache):
    d = tmp_path_factory.mktemp("kinds")
    text = TINY + "".join(f"[setups.{name}]\n{body}\n" for name, body in KINDS.items())
    path = d / "kinds.toml"
    path.write_text(text)
    case = load_case(path)
    results = run_case(case, d / "out", "cpu", cache=seed_cache, timeout_s=600)
    return case, d / "out", results


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_setup_kind_runs_and_agrees_with_single(every_kind, kind):
    case, out, results = every_kind
    assert results[kind].status == "ok", results[kind].message
    ref = records.read_metrics(out / case.name / "single" / "metrics.csv")
    got = records.read_metrics(out / case.name / kind / "metrics.csv")
    assert [r["step"] for r in got] == [1, 2, 3]
    rtol = RTOL_BF16 if "bf16" in kind else RTOL
    for a, b in zip(ref, got):
        for metric, tol in rtol.items():
            assert math.isfinite(b[metric])
            assert abs(a[metric] - b[metric]) <= tol * abs(a[metric]), (kind, metric, a, b)
    weights = records.read_weights(out / case.name / kind / "weights.csv")
    assert [w["param"] for w in weights] == [w["param"] for w in records.read_weights(out / case.name / "single" / "weights.csv")]
    run = records.read_json(out / case.name / kind / "run.json")
    assert run["status"] == "ok" and run["world_size"] == 4 and run["backend"] == "gloo"


@pytest.mark.slow
def test_mesh_shapes_recorded(every_kind):
    case, out, _ = every_kind
    run = lambda name: records.read_json(out / case.name / name / "run.json")  # noqa: E731
    assert (run("hsdp")["mesh_dim_names"], run("hsdp")["mesh_shape"]) == (["dp_replicate", "dp_shard"], [2, 2])
    assert (run("pp_1f1b")["mesh_dim_names"], run("pp_1f1b")["mesh_shape"]) == (["pp", "dp_replicate"], [2, 2])
    assert run("single")["world_size"] == 1


@pytest.mark.slow
def test_batched_launch_equals_separate_launches(every_kind, tmp_path, seed_cache):
    """Setups sharing one torchrun launch give the same bits as each in a launch of its own."""
    case, out, _ = every_kind
    for name in ("fsdp", "pp_1f1b"):
        alone = replace(case, setups=(case.setup(name),))
        result = run_case(alone, tmp_path / name, "cpu", cache=seed_cache)[name]
        assert result.status == "ok", result.message
        for f in ("metrics.csv", "weights.csv"):
            batched = records.read_csv(out / case.name / name / f)[1]
            separate = records.read_csv(tmp_path / name / case.name / name / f)[1]
            key = "param" if f == "weights.csv" else "step"
            strip = lambda rows: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]  # noqa: E731
            assert strip(batched) == strip(separate), (name, f, key)
