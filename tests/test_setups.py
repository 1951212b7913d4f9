"""Every setup kind runs real torchrun + gloo ranks for a few steps and agrees with the single-process reference."""

import math
from dataclasses import replace

import pytest

from parity.core import records
from parity.run.runner import RunOptions, run_suite
from trained_together import PROBES, TRAIN

# fsdp first: the first training of the session's shared world-size-4 launch (cases train in name order, and no
# shared case's name sorts before "kinds"), the one that runs alone in a fresh process.
KINDS = {
    "fsdp": 'dp_api = "fully_shard"\ndp_shard = 4',
    "ddp": 'dp_api = "ddp"\ndp_replicate = 4',
    "replicate": 'dp_api = "replicate"\ndp_replicate = 4',
    "hsdp": 'dp_api = "fully_shard"\ndp_replicate = 2\ndp_shard = 2',
    "fsdp_tp": 'dp_api = "fully_shard"\ndp_shard = 2\ntp = 2',
    "replicate_tp": 'dp_api = "replicate"\ndp_replicate = 2\ntp = 2',
    "pp_gpipe": 'dp_api = "fully_shard"\ndp_shard = 2\npp = 2\npp_schedule = "gpipe"\nmicrobatches = 2',
    "pp_1f1b": 'dp_api = "replicate"\ndp_replicate = 2\npp = 2\npp_schedule = "1f1b"\nmicrobatches = 2',
    "pp_interleaved": 'dp_api = "fully_shard"\ndp_shard = 2\npp = 2\npp_schedule = "interleaved_1f1b"\nmicrobatches = 2',
    "fsdp_bf16": 'dp_api = "fully_shard"\ndp_shard = 4\nparam_dtype = "bfloat16"\nreduce_dtype = "float32"',
}
TRAINED_TOGETHER = {"kinds": '\ndescription = "every setup kind at world size 4 against one process"\n' + TRAIN + PROBES
                    + '[setups.single]\ndp_api = "none"\n' + "".join(f"[setups.{n}]\n{b}\n" for n, b in KINDS.items())}
# fp32 kinds agree with one process to ~1e-6 (measured at 8 CPU ranks); bf16 params to ~1e-2.
RTOL = {"loss": 1e-5, "grad_norm": 1e-4}
RTOL_BF16 = {"loss": 2e-2, "grad_norm": 1e-1}


@pytest.fixture(scope="module")
def every_kind(trained_together):
    return trained_together["kinds"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_setup_kind_runs_and_agrees_with_single(every_kind, kind):
    assert every_kind.results[kind].status == "ok", every_kind.results[kind].message
    ref = records.read_metrics(every_kind.dir("single") / "metrics.csv")
    got = records.read_metrics(every_kind.dir(kind) / "metrics.csv")
    assert [r["step"] for r in got] == [1, 2, 3]
    rtol = RTOL_BF16 if "bf16" in kind else RTOL
    for a, b in zip(ref, got):
        for metric, tol in rtol.items():
            assert math.isfinite(b[metric])
            assert abs(a[metric] - b[metric]) <= tol * abs(a[metric]), (kind, metric, a, b)
    weights = records.read_weights(every_kind.dir(kind) / "weights.csv")
    assert [w["param"] for w in weights] == [w["param"] for w in records.read_weights(every_kind.dir("single") / "weights.csv")]
    run = records.read_json(every_kind.dir(kind) / "run.json")
    assert run["status"] == "ok" and run["world_size"] == 4 and run["backend"] == "gloo"


@pytest.mark.slow
def test_mesh_shapes_recorded(every_kind):
    run = lambda name: records.read_json(every_kind.dir(name) / "run.json")  # noqa: E731
    assert (run("hsdp")["mesh_dim_names"], run("hsdp")["mesh_shape"]) == (["dp_replicate", "dp_shard"], [2, 2])
    assert (run("pp_1f1b")["mesh_dim_names"], run("pp_1f1b")["mesh_shape"]) == (["pp", "dp_replicate"], [2, 2])
    assert run("single")["world_size"] == 1


@pytest.fixture(scope="module")
def second_launch(every_kind, tmp_path_factory, seed_cache):
    """pp_1f1b, then fsdp, in one launch of their own (4 cores for lanes: one lane, one process)."""
    case = every_kind.case
    again = replace(case, setups=(case.setup("pp_1f1b"), case.setup("fsdp")))
    out = tmp_path_factory.mktemp("again")
    results = run_suite([again], out, {again.name: "cpu"}, RunOptions(cache=seed_cache, timeout_s=600, cores=4))
    return out, results[again.name]


def place_in_launch(out, label: str) -> tuple[int, int]:
    """(launch number, index among that launch's trainings) of the training that produced `label`'s records."""
    for launch in records.read_json(out / "plan.json")["launches"]:
        for i, t in enumerate(launch["trainings"]):
            if label == t["trained_as"] or label in t["shared_with"]:
                return launch["launch"], i
    raise AssertionError(f"{label} is in no launch of {out / 'plan.json'}")


@pytest.mark.slow
def test_batched_launch_equals_separate_launches(every_kind, second_launch):
    """A setup gives the same bits trained first in a fresh launch, as if alone, and after other setups in one:
    fsdp runs first in the shared launch and after pp_1f1b in a second launch, pp_1f1b the other way round."""
    out, results = second_launch
    first, later = place_in_launch(every_kind.out, "kinds/fsdp"), place_in_launch(every_kind.out, "kinds/pp_1f1b")
    assert first[1] == 0 and later[1] > 0, f"the shared suite trains fsdp at {first}, pp_1f1b at {later}"
    again = [place_in_launch(out, f"kinds/{n}") for n in ("pp_1f1b", "fsdp")]
    assert again == [(1, 0), (1, 1)], f"the second launch trains pp_1f1b, fsdp at {again}"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]  # noqa: E731
    for name in ("fsdp", "pp_1f1b"):
        assert results[name].status == "ok", results[name].message
        for f in ("metrics.csv", "weights.csv", "probes.csv"):
            batched = records.read_csv(every_kind.dir(name) / f)[1]
            separate = records.read_csv(out / every_kind.case.name / name / f)[1]
            assert strip(batched) == strip(separate), (name, f)
