"""The parallelism rules (parity.core.parallel_dims): each combination builds what it says or is rejected with one line.

The table below is read through `load_case`, so a rejection is checked as the user sees it
(`FILE: setups.NAME.KEY: ...; allowed: ...`), and an accepted combination is checked against the
mesh and wrapper dims that parity.rank.parallelize builds from the same rules. The real trainings at the
end run the combinations that used to crash or drop their wrapper.
"""

import math

import numpy as np
import pytest
import torch

from parity.core import records
from parity.core.parallel_dims import ParallelDims
from parity.case.loader import load_case
from parity.case.schema import SpecError
from trained_together import PROBES, TRAIN

HEAD = """
description = "one setup against a single process"
[train]
model = "tiny"
steps = 3
global_batch = 8
seq_len = 32
[setups.ref]
dp_api = "none"
[setups.s]
"""

# (setup body, mesh {dim: size} outermost first, dims fully_shard / replicate span)
VALID = [
    ('dp_api = "none"', {}, ()),
    ('dp_api = "none"\ntp = 2', {"tp": 2}, ()),
    ('dp_api = "none"\npp = 2\nmicrobatches = 2', {"pp": 2}, ()),
    ('dp_api = "ddp"', {}, ()),
    ('dp_api = "ddp"\ndp_replicate = 4', {"dp_replicate": 4}, ()),
    # FSDP over one rank is still FSDP: the dp_shard dim exists at size 1.
    ('dp_api = "fully_shard"', {"dp_shard": 1}, ("dp_shard",)),
    ('dp_api = "fully_shard"\ndp_shard = 4', {"dp_shard": 4}, ("dp_shard",)),
    # HSDP (n, 1) keeps its size-1 shard dim: it is its own mesh, not replicate.
    ('dp_api = "fully_shard"\ndp_replicate = 4', {"dp_replicate": 4, "dp_shard": 1}, ("dp_replicate", "dp_shard")),
    ('dp_api = "fully_shard"\ndp_replicate = 2\ndp_shard = 2', {"dp_replicate": 2, "dp_shard": 2}, ("dp_replicate", "dp_shard")),
    ('dp_api = "fully_shard"\ndp_shard = 2\ntp = 2', {"dp_shard": 2, "tp": 2}, ("dp_shard",)),
    ('dp_api = "fully_shard"\ntp = 2', {"dp_shard": 1, "tp": 2}, ("dp_shard",)),
    ('dp_api = "fully_shard"\ndp_shard = 2\npp = 2\nmicrobatches = 2', {"pp": 2, "dp_shard": 2}, ("dp_shard",)),
    ('dp_api = "fully_shard"\ndp_shard = 2\ngradient_divide_factor = 2.0', {"dp_shard": 2}, ("dp_shard",)),
    # replicate always has its dp_replicate dim, size 1 included: at world size 1 (it used to crash
    # with no mesh) and beside TP or PP (it used to be skipped, dropping param_dtype and the divide factor).
    ('dp_api = "replicate"', {"dp_replicate": 1}, ("dp_replicate",)),
    ('dp_api = "replicate"\ndp_replicate = 4', {"dp_replicate": 4}, ("dp_replicate",)),
    ('dp_api = "replicate"\ntp = 2\nparam_dtype = "bfloat16"', {"dp_replicate": 1, "tp": 2}, ("dp_replicate",)),
    ('dp_api = "replicate"\ndp_replicate = 2\ntp = 2', {"dp_replicate": 2, "tp": 2}, ("dp_replicate",)),
    ('dp_api = "replicate"\npp = 2\nmicrobatches = 2', {"pp": 2, "dp_replicate": 1}, ("dp_replicate",)),
    ('dp_api = "replicate"\ndp_replicate = 2\npp = 2\npp_schedule = "gpipe"\nmicrobatches = 2',
     {"pp": 2, "dp_replicate": 2}, ("dp_replicate",)),
    ('dp_api = "replicate"\ndp_replicate = 4\ngradient_divide_factor = 1.0', {"dp_replicate": 4}, ("dp_replicate",)),
    # A different seed and optimizer settings stay allowed per setup: negative controls use them.
    ('dp_api = "none"\nseed = 7\nlr = 0.001\nweight_decay = 0.0\nmax_norm = 0.5\nwarmup_steps = 1', {}, ()),
]


@pytest.mark.parametrize("body, mesh, dp_dims", VALID, ids=[b.replace("\n", "; ") for b, _, _ in VALID])
def test_valid_combination_builds_these_dims(write_case, body, mesh, dp_dims):
    s = load_case(write_case(HEAD + body)).setup("s")
    assert s.dims.mesh == mesh
    assert s.dims.dp_dims == dp_dims
    assert math.prod(mesh.values()) == s.world_size  # the mesh covers every rank


# (setup body, key under setups.s, fragment of the message)
REJECTED = [
    ('dp_api = "replicate"\ndp_shard = 2', "dp_shard", "replicate does not shard"),
    ('dp_api = "ddp"\ntp = 2', "dp_api", "takes only dp_replicate"),
    ('dp_api = "ddp"\npp = 2\nmicrobatches = 2', "dp_api", "PP x DDP"),
    ('dp_api = "none"\ndp_replicate = 2', "dp_api", "data-parallel degree of 2"),
    ('dp_api = "ddp"\ndp_replicate = 2\nparam_dtype = "bfloat16"', "param_dtype", "would be ignored"),
    ('dp_api = "none"\ntp = 2\nreduce_dtype = "bfloat16"', "reduce_dtype", "would be ignored"),
    ('dp_api = "none"\ntp = 2\ngradient_divide_factor = 1.0', "gradient_divide_factor", "would be ignored"),
    ('dp_api = "ddp"\ndp_replicate = 2\ngradient_divide_factor = 2.0', "gradient_divide_factor", "would be ignored"),
    # torch divides by the factor twice when the reduce-scatter group has one rank (gloo force-sum path).
    ('dp_api = "replicate"\ndp_replicate = 2\ngradient_divide_factor = 2.0', "gradient_divide_factor", "applied twice"),
    ('dp_api = "fully_shard"\ndp_replicate = 2\ngradient_divide_factor = 2.0', "gradient_divide_factor", "applied twice"),
    ('dp_api = "fully_shard"\npp_schedule = "gpipe"', "pp_schedule", "with pp = 1 would be ignored"),
    ('dp_api = "none"\nfault = "replicated_data"', "fault", "no-op at data-parallel degree 1"),
    ('dp_api = "none"\nfault = "crash"', "fault", "world size >= 2"),
    ('dp_api = "fully_shard"\nfault = "local_clip"', "fault", "allowed only with pp >= 2"),
    ('dp_api = "fully_shard"\ntp = 3', "tp", "does not divide n_heads"),
    ('dp_api = "fully_shard"\ndp_shard = 3', "dp_replicate", "does not divide global_batch"),
    ('dp_api = "fully_shard"\npp = 8\nmicrobatches = 8', "pp", "exceed"),
    ('dp_api = "fully_shard"\ndp_shard = 2\nmicrobatches = 3', "microbatches", "does not divide the local batch"),
    ('dp_api = "fully_shard"\npp = 2', "microbatches", "at least one microbatch per stage"),
    ('dp_api = "replicate"\ndp_replicate = 1024\ntp = 2', "dp_replicate", "at most 1024"),
    # What every setup of a comparison must share.
    ('dp_api = "none"\nsteps = 4', "steps", "a setup may not override steps; allowed: set it in [train] for every setup"),
    ('dp_api = "none"\nmodel = "debugmodel"', "model", "may not override model"),
    ('dp_api = "none"\nseq_len = 16', "seq_len", "may not override seq_len"),
    ('dp_api = "none"\nglobal_batch = 4', "global_batch", "may not override global_batch"),
    ('dp_api = "none"\ndata = "tokens.npy"', "data", "may not override data"),
]


@pytest.mark.parametrize("body, key, fragment", REJECTED, ids=[b.replace("\n", "; ") for b, _, _ in REJECTED])
def test_rejected_combination_is_one_line_naming_the_key(write_case, body, key, fragment):
    path = write_case(HEAD + body)
    with pytest.raises(SpecError) as e:
        load_case(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: setups.s.{key}: "), msg
    assert fragment in msg, msg
    assert "allowed" in msg or "needs" in msg, msg  # says what would be accepted


def test_parallelize_reads_the_same_rules():
    """The mesh builder has no rule of its own: its dims are ParallelDims's for every dp_api."""
    from parity.rank.parallelize import mesh_dims
    from parity.case.schema import Setup, Train

    for api in ("none", "ddp", "fully_shard", "replicate"):
        for rep, shard, tp, pp in ((1, 1, 1, 1), (2, 1, 2, 1), (1, 1, 1, 2), (2, 2, 1, 1)):
            s = Setup(name="s", train=Train(), dp_api=api, dp_replicate=rep, dp_shard=shard, tp=tp, pp=pp)
            assert mesh_dims(s) == ParallelDims.of(s).mesh


# Combinations that used to crash (replicate at world size 1) or run without their wrapper
# (replicate with dp_replicate = 1 beside TP or PP), trained for real with torchrun and gloo in the
# session's shared launches (tests/trained_together.py) against the same setup without the wrapper.
TRAINED_TOGETHER = {"replicate_one": '''
description = "replicate with dp_replicate = 1, alone or beside TP 2 or PP 2, against the same setup unwrapped"
''' + TRAIN + PROBES + '''
[setups.ref]
dp_api = "none"
[setups.replicate_1]
dp_api = "replicate"
[setups.replicate_1_half]
dp_api = "replicate"
param_dtype = "bfloat16"
[setups.tp_only]
dp_api = "none"
tp = 2
[setups.replicate_1_tp]
dp_api = "replicate"
tp = 2
[setups.replicate_1_tp_half]
dp_api = "replicate"
tp = 2
param_dtype = "bfloat16"
[setups.pp_only]
dp_api = "none"
pp = 2
microbatches = 2
[setups.replicate_1_pp]
dp_api = "replicate"
pp = 2
microbatches = 2
[expect]
mode = "tolerance"
'''}


def _metrics(trained, name):
    return records.read_metrics(trained.dir(name) / "metrics.csv")


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]


@pytest.mark.parametrize("pairs, half", [
    ([("ref", "replicate_1", (["dp_replicate"], [1]))], ("ref", "replicate_1_half")),
    ([("tp_only", "replicate_1_tp", (["dp_replicate", "tp"], [1, 2])),
      ("pp_only", "replicate_1_pp", (["pp", "dp_replicate"], [2, 1]))], ("tp_only", "replicate_1_tp_half")),
], ids=["world_size_1", "tp_2_and_pp_2"])
@pytest.mark.slow
def test_replicate_with_one_replica_runs_and_keeps_its_policy(trained_together, pairs, half):
    trained = trained_together["replicate_one"]
    for plain, wrapped, _ in pairs:
        for name in (plain, wrapped, half[1]):
            assert trained.results[name].status == "ok", trained.results[name].message
    for plain, wrapped, mesh in pairs:
        run = records.read_json(trained.dir(wrapped) / "run.json")
        assert (run["mesh_dim_names"], run["mesh_shape"]) == mesh  # the wrapper's dim exists, at size 1
        # Averaging over one replica changes nothing: the loss bit for bit the unwrapped setup's. The
        # recorded grad norm is assembled over the wrapped model's 2-D mesh (dp_replicate x tp) rather
        # than the 1-D tp mesh, so its float32 rounding may differ in the last place: on an Intel Xeon
        # (AVX512, torch 2.13; global batch 8, sequence 32) step 3 of replicate_1_tp read 0.5313622951507568
        # against tp_only's 0.5313623547554016, one float32 ULP; on an AMD EPYC the two were equal.
        got, want = _strip(_metrics(trained, wrapped)), _strip(_metrics(trained, plain))
        assert [{**r, "grad_norm": None} for r in got] == [{**r, "grad_norm": None} for r in want], wrapped
        for g, w in zip(got, want):
            assert abs(g["grad_norm"] - w["grad_norm"]) <= np.spacing(np.float32(w["grad_norm"])), (wrapped, g, w)
    # The bf16 param_dtype is applied, not dropped: the numbers move, by bf16 rounding only.
    ref, got = _metrics(trained, half[0]), _metrics(trained, half[1])
    assert [r["loss"] for r in got] != [r["loss"] for r in ref]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * abs(a["loss"]), (a, b)


def test_fsdp_groups_are_blocks_then_root():
    """Each block, then the root holding token embeddings, norm and output: README states how this differs from
    torchtitan (which also groups the embeddings, and norm with output), and the committed baselines depend on it."""
    from parity.rank.model import build_model
    from parity.rank.parallelize import dp_groups, stage_module
    from parity.core.presets import PRESETS

    model = build_model(PRESETS["tiny"], 32, seed=0)
    assert dp_groups(model) == [*model.layers.values(), model]
    last = stage_module(model, 1, 2)
    assert dp_groups(last) == [*last.layers.values(), last]


class _NoCopy(torch.nn.Module):
    def __deepcopy__(self, memo):
        raise AssertionError("stage_module copied a module its stage drops")


def test_a_stage_copies_only_what_it_keeps():
    """A pipeline stage never copies the layers (or embeddings, norm, output) another stage holds."""
    from parity.rank.model import build_meta_model
    from parity.rank.parallelize import stage_module
    from parity.core.presets import PRESETS

    model = build_meta_model(PRESETS["tiny"], 32)
    model.layers["0"], model.layers["1"] = _NoCopy(), _NoCopy()
    model.tok_embeddings = _NoCopy()
    last = stage_module(model, 1, 2)
    assert list(last.layers) == ["2", "3"] and last.tok_embeddings is None
    assert last.layers["2"] is not model.layers["2"]  # a copy, so wrapping it leaves the model alone
    with pytest.raises(AssertionError, match="copied a module"):
        stage_module(model, 0, 2)
