"""Weight sketches: random projections of each parameter that see what its norm cannot.

The math on hand-made tensors (milliseconds), the weights lane of compare on hand-made rows, and
real trainings (tiny model, 2 and 4 gloo ranks, 1 step, in the session's shared launches:
tests/trained_together.py) of several layouts of the same training, two of them with a shard
corrupted after the last step.
"""

import math

import numpy as np
import pytest
import torch

from parity.core import records
from parity.verdict.case_verdict import compare_case
from parity.verdict.series import compare_weights
from parity.core.records import SKETCH_COLUMNS
from parity.case.loader import load_case
from parity.case.schema import Tolerance
from parity.rank.hashing import key64, splitmix64
from parity.rank.sketch import sketch_block
from parity.rank.digest import box_index_sum
from parity.rank.faults import FAULT_PARAM

K = len(SKETCH_COLUMNS)


def sketch_of_split(name: str, w: torch.Tensor, splits: tuple[int, ...]) -> np.ndarray:
    """Sum of sketch_block over the boxes of `w` cut into splits[d] pieces along each dim d (uneven
    where the size does not divide, as torch.tensor_split cuts), each box given its global offset."""
    total = np.zeros(K)
    pieces = [torch.tensor_split(torch.arange(n), k) for n, k in zip(w.shape, splits)]
    for box in np.ndindex(*splits):
        idx = [pieces[d][i] for d, i in enumerate(box)]
        if any(len(i) == 0 for i in idx):
            continue
        offset = tuple(int(i[0]) for i in idx)
        block = w[tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)]
        total += sketch_block(name, block, offset, tuple(w.shape))
    return total


def sketch_by_definition(name: str, w: torch.Tensor) -> np.ndarray:
    """s_k = sum_i w_i * r_k(i), r_k(i) = -1 where bit k (from the top) of splitmix64(i ^ key) is set."""
    with np.errstate(over="ignore"):
        h = splitmix64(np.arange(w.numel(), dtype=np.uint64) ^ np.uint64(key64(name)))
    r = np.stack([1.0 - 2.0 * ((h >> np.uint64(63 - k)) & np.uint64(1)).astype(np.float64) for k in range(K)], axis=1)
    return w.reshape(-1).double().numpy() @ r


@pytest.mark.parametrize("shape,splits", [
    ((48, 40), [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (2, 2), (5, 3)]),  # (5, 3): uneven boxes
    ((6, 10, 8), [(1, 1, 1), (2, 1, 1), (1, 2, 4), (3, 2, 2)]),
    ((97,), [(1,), (2,), (4,), (7,)]),
])
def test_every_split_gives_the_same_sketch(shape, splits):
    # float64 values, so that the sums really round: the boxes add their elements in another
    # order (and the buckets group them by sign pattern), so the sketches agree to float64
    # rounding of sums of ~numel terms, not bitwise. (float32 weights held in float64 often sum
    # exactly and would hide that.)
    w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    norm = torch.linalg.vector_norm(w).item()
    want = sketch_by_definition("layers.0.w", w)
    assert np.all(np.abs(want) > 1e-3 * norm)  # not a degenerate projection
    for split in splits:
        got = sketch_of_split("layers.0.w", w, split)
        assert np.max(np.abs(got - want)) <= 1e-14 * norm, (split, got, want)


def test_scalar_and_empty_boxes():
    assert sketch_by_definition("s", torch.tensor([2.5])) == pytest.approx(sketch_block("s", torch.tensor(2.5), (), ()))
    assert np.all(sketch_block("w", torch.zeros(0, 4), (6, 0), (6, 4)) == 0.0)  # an empty shard adds nothing


def test_the_norm_misses_what_the_sketch_sees():
    w = torch.randn(48, 48, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    norm = lambda t: torch.linalg.vector_norm(t.double()).item()  # noqa: E731
    base = sketch_block(FAULT_PARAM, w, (0, 0), (48, 48))
    shard = w[:24]  # the first of two row shards, corrupted the way the planted faults do
    negated = torch.cat([-shard, w[24:]])
    permuted = torch.cat([shard.t().contiguous().view(shard.shape), w[24:]])
    transposed = w.t().contiguous()
    assert norm(negated) == norm(w)  # the same squares in the same order: bitwise the same norm
    assert abs(norm(permuted) - norm(w)) <= 1e-15 * norm(w) and abs(norm(transposed) - norm(w)) <= 1e-15 * norm(w)
    for bad in (negated, permuted, transposed):
        moved = np.max(np.abs(sketch_block(FAULT_PARAM, bad, (0, 0), (48, 48)) - base))
        assert moved > 0.1 * norm(w), moved  # of the order of the norm of what changed
    # Another parameter's signs are independent: the same values sketch differently under another name.
    assert np.max(np.abs(sketch_block("other", w, (0, 0), (48, 48)) - base)) > 0.1 * norm(w)


def test_box_index_sum_is_the_sum_of_flat_indices():
    shape = (6, 5, 4)
    flat = np.arange(math.prod(shape)).reshape(shape)
    for box, offset in [((6, 5, 4), (0, 0, 0)), ((3, 5, 4), (3, 0, 0)), ((2, 2, 3), (1, 3, 1)), ((0, 5, 4), (6, 0, 0))]:
        assert box_index_sum(box, offset, shape) == flat[tuple(slice(o, o + b) for o, b in zip(offset, box))].sum()
    assert box_index_sum((), (), ()) == 0


# ---- the weights lane ----------------------------------------------------------------------

TOL = Tolerance(rtol=1e-6, atol=0.0)
NORMS = (12.345678901234567, 0.98765432109876543)
SKETCHES = ((9.87, -3.21, 0.5, 14.1), (0.0012, -0.7, 0.31, -0.09))


def rows(norms=NORMS, sketches=SKETCHES, shas=("a" * 64, "b" * 64)):
    return [{"param": f"layers.{i}.w", "norm": n, "sha256": s, **dict(zip(SKETCH_COLUMNS, sk))}
            for i, (n, sk, s) in enumerate(zip(norms, sketches, shas))]


def strip(weights):
    return [{k: v for k, v in r.items() if k not in SKETCH_COLUMNS} for r in weights]


def test_a_sketch_only_difference_fails_on_that_param():
    flipped = (SKETCHES[0], tuple(-s for s in SKETCHES[1]))  # layers.1.w negated: its norm is unchanged
    other = rows(sketches=flipped)
    m = compare_weights(rows(), other, TOL)
    assert not m.passed and m.failing_steps == 1
    e = m.first_beyond_tolerance
    # The worst sketch of layers.1.w is sketch1 (|-0.7 - 0.7| = 1.4), reported relative to its norm.
    assert (e["param"], e["sketch"], e["value_ref"], e["value_other"]) == ("layers.1.w", 1, -0.7, 0.7)
    assert e["abs"] == 1.4 and e["rel"] == 1.4 / NORMS[1]
    assert compare_weights(strip(rows()), strip(other), TOL).passed  # the norm lane alone misses it


def test_sketch_bound_scales_with_the_norm_not_the_sketch():
    # sketch0 of layers.1.w is 0.0012; a change of 0.9e-6 is 7.5e-4 of it but within 1e-6 * norm.
    near = rows(sketches=(SKETCHES[0], (0.0012 + 0.9e-6, *SKETCHES[1][1:])))
    assert compare_weights(rows(), near, TOL).passed
    past = rows(sketches=(SKETCHES[0], (0.0012 + 1.1e-6, *SKETCHES[1][1:])))
    m = compare_weights(rows(), past, TOL)
    assert not m.passed and (m.first_beyond_tolerance["param"], m.first_beyond_tolerance["sketch"]) == ("layers.1.w", 0)


def test_a_nan_sketch_never_passes():
    m = compare_weights(rows(), rows(sketches=(SKETCHES[0], (math.nan, *SKETCHES[1][1:]))), Tolerance(1e9, 1e9))
    assert not m.passed and m.first_beyond_tolerance["sketch"] == 0


def test_files_without_sketch_columns_still_compare_on_norms(tmp_path):
    old = tmp_path / "weights.csv"
    records.write_weights(old, strip(rows()))
    assert old.read_text().splitlines()[0] == "param,norm,sha256"
    back = records.read_weights(old)
    assert compare_weights(back, rows(), TOL).passed  # one side without sketches: norms only
    assert not compare_weights(back, rows(norms=(NORMS[0], NORMS[1] * 1.01)), TOL).passed
    new = tmp_path / "new.csv"
    records.write_weights(new, rows())
    assert records.read_weights(new) == rows()  # repr round trip: every sketch bit comes back
    with pytest.raises(ValueError, match="some have sketch columns"):
        records.write_weights(tmp_path / "mixed.csv", rows()[:1] + strip(rows())[1:])


def test_calibrate_measures_sketch_errors_against_the_norm(tmp_path):
    # The weights lane bounds norms and sketches with one rtol, so calibrate must propose it from
    # both: here the norm is exact and sketch2 is off by 3e-6 of the norm (3e-3 of the sketch).
    from dataclasses import replace as _replace

    from parity.calibrate import ORACLE, errors_against_oracle, oracle_setup
    from parity.case.schema import Setup, Train

    case = _replace(load_case("cases/single_vs_fsdp.toml"), name="calib")
    case = _replace(case, setups=(oracle_setup(case), Setup(name="b", train=Train())))
    sketch = dict(zip(SKETCH_COLUMNS, (1.0, -2.0, 1e-3, 0.5)))
    off = {**sketch, "sketch2": 1e-3 + 3e-6}
    for name, sk in ((ORACLE, sketch), ("b", off)):
        d = records.setup_dir(tmp_path, "calib", name)
        records.write_metrics(d / "metrics.csv", [{"step": 1, "loss": 2.0, "grad_norm": 1.0, "lr": 1e-3, "tokens": 1,
                                                   "step_time_s": 0.0}])
        records.write_weights(d / "weights.csv", [{"param": "w", "norm": 1.0, "sha256": "x", **sk}])
        records.write_json(d / "run.json", {"status": "ok"})
    assert errors_against_oracle(tmp_path, case)["b"]["weights"] == pytest.approx(3e-6)


# ---- real launches -------------------------------------------------------------------------

# float64 training, so that the layouts' weights differ by float64 rounding only (~1e-16
# relative): what is left for 1e-12 to catch is the sketch itself disagreeing across layouts.
# The layouts cover every way a rank holds a parameter: a DDP copy, FSDP row shards, HSDP and
# replicate replicas (Replicate placements), TP column and row shards, FSDP over TP
# (_StridedShard), and pipeline stages holding DTensors or plain tensors (pp_plain, 2 ranks).
LAYOUTS = """
description = "one training, several layouts, two with a corrupted shard"
[train]
model = "tiny"
steps = 1
global_batch = 4
seq_len = 16
dtype = "float64"
[setups.ddp]
dp_api = "ddp"
dp_replicate = 4
[setups.fsdp]
dp_api = "fully_shard"
dp_shard = 4
[setups.hsdp]
dp_api = "fully_shard"
dp_replicate = 2
dp_shard = 2
[setups.fsdp_tp]
dp_api = "fully_shard"
dp_shard = 2
tp = 2
[setups.tp]
dp_api = "none"
tp = 4
[setups.pp_fsdp]
dp_api = "fully_shard"
dp_shard = 2
pp = 2
pp_schedule = "gpipe"
microbatches = 2
[setups.replicate]
dp_api = "replicate"
dp_replicate = 4
[setups.replicate_tp]
dp_api = "replicate"
dp_replicate = 2
tp = 2
[setups.pp_plain]
dp_api = "none"
pp = 2
pp_schedule = "gpipe"
microbatches = 2
[setups.fsdp_negate]
dp_api = "fully_shard"
dp_shard = 4
fault = "negate_shard"
[setups.fsdp_tp_transpose]
dp_api = "fully_shard"
dp_shard = 2
tp = 2
fault = "transpose_shard"
[expect]
mode = "tolerance"
"""
TRAINED_TOGETHER = {"sketch": LAYOUTS}
HEALTHY = ("fsdp", "hsdp", "fsdp_tp", "tp", "pp_fsdp", "replicate", "replicate_tp", "pp_plain")
FAULTY = {"fsdp_negate": "fsdp", "fsdp_tp_transpose": "fsdp_tp"}  # each with its healthy twin


@pytest.fixture(scope="module")
def layouts(trained_together):
    sketch = trained_together["sketch"]
    assert all(r.status == "ok" for r in sketch.results.values()), {n: r.message for n, r in sketch.results.items()}
    weights = {s.name: {r["param"]: r for r in records.read_weights(sketch.dir(s.name) / "weights.csv")}
               for s in sketch.case.setups}
    return sketch.case, sketch.out, weights


@pytest.mark.slow
@pytest.mark.parametrize("setup", HEALTHY)
def test_layouts_of_one_training_have_the_same_sketches(layouts, setup):
    _, _, weights = layouts
    ref, got = weights["ddp"], weights[setup]
    assert list(got) == list(ref)
    for name, r in ref.items():
        worst = max(abs(got[name][c] - r[c]) for c in SKETCH_COLUMNS)
        assert worst <= 1e-12 * r["norm"], (setup, name, worst / r["norm"])
        assert max(abs(r[c]) for c in SKETCH_COLUMNS) > 1e-2 * r["norm"], name  # a real projection, not zeros


@pytest.mark.slow
@pytest.mark.parametrize("faulty", list(FAULTY))
def test_a_corrupted_shard_is_caught_on_that_parameter_only(layouts, faulty):
    case, out, weights = layouts
    verdict = compare_case(case, out)
    pair = next(p for p in verdict.pairs if p.other == faulty)
    m = pair.metrics
    # Planted after the last step: the step metrics cannot see it.
    assert m["loss"].passed and m["grad_norm"].passed
    assert not pair.passed and m["weights"].failing_steps == 1
    e = m["weights"].first_beyond_tolerance
    assert e["param"] == FAULT_PARAM and "sketch" in e and e["rel"] > 0.1
    assert pair.diverged["metric"] == "weights" and pair.diverged["param"] == FAULT_PARAM
    # The norm lane alone passes it: the corrupted parameter's norm is its healthy twin's.
    twin = weights[FAULTY[faulty]][FAULT_PARAM]["norm"]
    assert abs(weights[faulty][FAULT_PARAM]["norm"] - twin) <= 1e-15 * twin
    if faulty == "fsdp_negate":
        assert weights[faulty][FAULT_PARAM]["norm"] == twin  # negation: the same bits
    ref_rows = list(weights["ddp"].values())
    assert compare_weights(strip(ref_rows), strip(weights[faulty].values()), case.expect.tolerance["weights"]).passed
    for healthy in HEALTHY:  # the weights lane flags no healthy layout
        assert next(p for p in verdict.pairs if p.other == healthy).metrics["weights"].passed, healthy
