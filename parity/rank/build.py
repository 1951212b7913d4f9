"""A setup's model on this rank: built on the meta device, parallelized, given storage and its
starting weights (the seed checkpoint, perturbed for a weights-ensemble member).
"""

from __future__ import annotations

import time

import torch

from parity.case.schema import Setup
from parity.rank.faults import PlantedFault
from parity.rank.hashing import host_generator
from parity.rank.model import build_meta_model
from parity.rank.parallelize import parallelize
from parity.rank.shards import held_part
from parity.rank.step import loss_fn


def build_parallel(setup: Setup, ckpt: str, device: torch.device, timings: dict | None = None):
    """(the model, its Parallel), loaded. Built on the meta device and allocated after parallelize: a
    rank allocates only the shards and pipeline stages it holds, never a full copy of the model
    first (torchtitan's order). DDP and a bare single model allocate, load, then wrap. `timings`
    gets parallelize_s (mesh and wrappers) and seed_load_s (allocation and the checkpoint's read)."""
    t = setup.train
    timings = {} if timings is None else timings
    model = build_meta_model(t.model_config, t.seq_len, getattr(torch, t.dtype))

    def timed(key, fn, *args):
        began = time.perf_counter()
        result = fn(*args)
        timings[key] = time.perf_counter() - began
        return result

    if setup.dims.seed_before_wrap:
        timed("seed_load_s", allocate_and_load, [model], ckpt, setup, device)
        return model, timed("parallelize_s", parallelize, model, setup, device, loss_fn)
    par = timed("parallelize_s", parallelize, model, setup, device, loss_fn)
    timed("seed_load_s", allocate_and_load, par.modules, ckpt, setup, device)
    return model, par


def allocate_and_load(modules: list, ckpt: str, setup: Setup, device: torch.device) -> None:
    """Give the meta-device module(s) storage on `device` and their weights: the seed checkpoint (perturbed
    for a weights-ensemble member), unless the setup's planted fault replaces the load (skip_seed_load)."""
    for m in modules:
        m.to_empty(device=device)
        m.init_buffers()
    if not PlantedFault(setup).replace_seed_load(modules):
        load_seed(modules, ckpt)
    if setup.perturb is not None:
        perturb_weights(modules, setup.perturb)


def perturb_weights(modules: list, member: int) -> None:
    """A weights-ensemble member's start: every loaded weight times (1 + eps z), z ~ N(0, 1) drawn on the host
    per full tensor from (member, parameter name), eps the weight dtype's machine epsilon. A few ULPs: the
    size of difference a changed reduction order leaves, here put into the weights. Each rank scales the
    part it holds, so a member starts from the same bits in every layout."""
    for m in modules:
        for name, p in m.named_parameters():
            local, part = held_part(p)
            z = torch.randn(p.shape, generator=host_generator("perturb", member, name.removeprefix("module.")))
            factor = 1 + torch.finfo(local.dtype).eps * z[part].to(local.dtype)  # drawn whole, used where held
            with torch.no_grad():
                local.mul_(factor.to(local.device))


def load_seed(modules: list, ckpt: str):
    """DCP load into the (wrapped) model(s): each rank reads only what its shards hold."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    parts = [get_model_state_dict(m) for m in modules]
    merged = {k: v for part in parts for k, v in part.items()}  # stage FQNs are disjoint
    dcp.load(merged, checkpoint_id=ckpt)
    for m, part in zip(modules, parts):
        set_model_state_dict(m, {k: merged[k] for k in part})
