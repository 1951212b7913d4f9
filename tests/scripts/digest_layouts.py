"""Rank-side check of the weight digest, launched by tests/test_digest_layouts.py under torchrun (4 gloo ranks).

For each layout: build the setup's model the way training does (parity.rank.build.build_parallel: meta
device, parallelize, allocate, load) and take parity.rank.digest.weight_digest of it, untrained. Rank 0
compares it with the digest of the same weights as one plain full model on the host
(parity.rank.sketch.state_dict_digest): norm and sha256 must be bit for bit the same, sketches the
same to float64 rounding. The same for the `skip_seed_load` fault's init, which must not depend on
the layout. Rank 0 writes what differed, one line each, to OUT (empty: all agree).

    python -m torch.distributed.run --standalone --nproc-per-node=4 tests/scripts/digest_layouts.py CKPT OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: parity lives two levels up

import torch
import torch.distributed as dist

from parity.rank.model import build_meta_model
from parity.core.records import SKETCH_COLUMNS
from parity.rank.sketch import state_dict_digest
from parity.case.schema import Setup, Train
from parity.rank.build import allocate_and_load, build_parallel
from parity.rank.digest import weight_digest

TRAIN = Train(model="tiny", seq_len=32, global_batch=8)
# Every way a rank holds a parameter: a DDP copy, FSDP row shards, HSDP and replicate replicas,
# TP column and row shards, FSDP over TP, pipeline stages of FSDP shards and of replicas.
LAYOUTS = {
    "ddp": {"dp_api": "ddp", "dp_replicate": 4},
    "fsdp": {"dp_api": "fully_shard", "dp_shard": 4},
    "hsdp": {"dp_api": "fully_shard", "dp_replicate": 2, "dp_shard": 2},
    "fsdp_tp": {"dp_api": "fully_shard", "dp_shard": 2, "tp": 2},
    "replicate": {"dp_api": "replicate", "dp_replicate": 4},
    "tp": {"dp_api": "none", "tp": 4},
    "pp_fsdp": {"dp_api": "fully_shard", "dp_shard": 2, "pp": 2, "pp_schedule": "gpipe", "microbatches": 2},
    "pp_replicate": {"dp_api": "replicate", "dp_replicate": 2, "pp": 2, "pp_schedule": "gpipe", "microbatches": 2},
}


# How a run's first weights are made: loaded, fresh-initialised (the skip_seed_load fault), or loaded and
# perturbed as weights-ensemble member 3 is.
STARTS = {"seed": {}, "skip_seed_load": {"fault": "skip_seed_load"}, "member 3": {"perturb": 3}}


def plain_digest(ckpt: str, start: dict) -> list[dict]:
    """The digest of one whole model on the host, made as a one-process setup makes it."""
    model = build_meta_model(TRAIN.model_config, TRAIN.seq_len)
    allocate_and_load([model], ckpt, Setup(name="plain", train=TRAIN, dp_api="none", **start), torch.device("cpu"))
    return state_dict_digest(dict(model.named_parameters()))


def differences(layout: str, got: list[dict], want: list[dict]) -> list[str]:
    if [r["param"] for r in got] != [r["param"] for r in want]:
        return [f"{layout}: parameters {[r['param'] for r in got][:3]}... are not {[r['param'] for r in want][:3]}..."]
    out = []
    for g, w in zip(got, want):
        if (g["norm"], g["sha256"]) != (w["norm"], w["sha256"]):
            out.append(f"{layout} {g['param']}: norm {g['norm']!r} sha256 {g['sha256'][:12]} "
                       f"where the full tensor has {w['norm']!r} {w['sha256'][:12]}")
        worst = max(abs(g[c] - w[c]) for c in SKETCH_COLUMNS)
        if worst > 1e-12 * w["norm"]:
            out.append(f"{layout} {g['param']}: sketches differ by {worst!r}")
    return out


def main(ckpt: str, out: str) -> None:
    dist.init_process_group("gloo")
    problems = []
    seed_digest = None
    for start, fields in STARTS.items():
        want = plain_digest(ckpt, fields)  # on every rank: loading the seed is a collective
        if start == "seed":
            seed_digest = want
        elif [r["sha256"] for r in want] == [r["sha256"] for r in seed_digest]:
            problems.append(f"{start}: the same weights as the seed checkpoint's")
        for layout, dims in LAYOUTS.items():
            setup = Setup(name=layout, train=TRAIN, **fields, **dims)
            _, par = build_parallel(setup, ckpt, torch.device("cpu"))
            got = weight_digest(par)
            if dist.get_rank() == 0:
                problems += differences(f"{layout} ({start})", got, want)
            del par
            dist.barrier()
    if dist.get_rank() == 0:
        Path(out).write_text("".join(p + "\n" for p in problems))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
