"""Planted faults: the bugs the negative-control cases plant in one setup, so that a case can show
that parity catches them (parity.case.schema: FAULTS, and FAULT_TABLES for the ones that say where).

A setup's fault is a `PlantedFault` value, whose hooks the rank calls at fixed points (the seed load
in parity.rank.build, the rest in the train loop); for a setup without a fault every hook does
nothing, and the rank computes exactly what it would without them.

    replace_seed_load   while loading       skip_seed_load: a fresh init instead of the seed checkpoint
    after_build         after parallelize   scale_output: a forward hook (registered before the probes')
    data_rank           before the steps    replicated_data: every rank reads dp rank 0's rows
    before_step         each step's start   hang / crash: rank FAULT_RANK at FAULT_STEP
    after_backward      after backward      noise (the repeat run, FAULT_STEP), scale_grad: every step
    clip_norm           before the clip     local_clip: each pipeline stage clips by its own norm
    after_training      after the last step negate_shard / transpose_shard: rank 0's shard of FAULT_PARAM
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from parity.case.schema import ALL_PARAMS, Setup
from parity.rank.hashing import host_generator
from parity.rank.parallelize import Parallel
from parity.rank.shards import held_part

FAULT_RANK = 1  # the rank that hangs or crashes in the `hang` / `crash` fault setups
FAULT_STEP = 2  # the step of every planted fault that happens at one step
# The shard faults corrupt rank 0's local shard of this parameter after the last step. Every
# layout holds it on rank 0: layers.0 lives in the first pipeline stage, on pp rank 0.
FAULT_PARAM = "layers.0.feed_forward.w1.weight"
HANG_S = 10**6  # a hang outlasts any setup's timeout


class PlantedFault:
    """The hooks of one setup's planted fault (setup.fault; None plants nothing)."""

    def __init__(self, setup: Setup):
        self.kind, self.at, self.factor = setup.fault, setup.fault_at, setup.fault_factor
        self.repeat, self.seed = setup.repeat, setup.train.seed

    def replace_seed_load(self, modules: list) -> bool:
        """skip_seed_load: give the allocated modules fresh_init's weights. True when the seed load is replaced."""
        if self.kind != "skip_seed_load":
            return False
        fresh_init(modules, self.seed)
        return True

    def after_build(self, par: Parallel) -> None:
        if self.kind == "scale_output":
            scale_output(par, self.at, self.factor)

    def data_rank(self, par: Parallel) -> int:
        """The data-parallel rank whose rows this rank reads."""
        return 0 if self.kind == "replicated_data" else par.dp_rank

    def before_step(self, step: int) -> None:
        if self.kind not in ("hang", "crash") or dist.get_rank() != FAULT_RANK or step != FAULT_STEP:
            return
        if self.kind == "crash":
            raise RuntimeError(f"planted fault: rank {FAULT_RANK} crashes at step {step}")
        print(f"planted fault: rank {FAULT_RANK} hangs at step {step}", flush=True)
        time.sleep(HANG_S)

    def after_backward(self, par: Parallel, step: int) -> None:
        """Gradients computed, not yet measured or clipped."""
        if self.kind == "noise" and self.repeat and step == FAULT_STEP:
            nudge_gradients(par)
        if self.kind == "scale_grad":
            scale_grad(par, self.at, self.factor)

    def clip_norm(self, total: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """The norm the clip divides by: the global one, or under local_clip this pipeline stage's own.
        The recorded norm stays the global one, so only what the clip does to the weights (when it
        engages) can reveal it."""
        return stage if self.kind == "local_clip" else total

    def after_training(self, par: Parallel) -> None:
        if self.kind in ("negate_shard", "transpose_shard"):
            plant_shard_fault(par, self.kind)


def fresh_init(modules: list, seed: int) -> None:
    """The `skip_seed_load` fault's weights, the same in every layout: each parameter's full tensor is
    drawn on the host from a generator seeded by `seed` and its name (norm weights are ones), one
    parameter at a time, and each rank copies in the shard it holds."""
    for m in modules:
        for name, p in m.named_parameters():
            full = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=host_generator(seed, name)) * 0.02
            local, part = held_part(p)
            with torch.no_grad():
                local.copy_(full[part])


def scale_output(par: Parallel, module: str, factor: float) -> None:
    """The `scale_output` fault: multiply the named module's output by `factor` in every forward. Whatever
    this rank holds of it is scaled: a TP sequence shard or replicated copy, the module on its pipeline
    stage; a rank without the module does nothing."""
    for m in par.modules:
        for name, mod in m.named_modules():
            if name.removeprefix("module.") == module:
                mod.register_forward_hook(lambda mod, args, out: out * factor)


def _local_grad(p) -> torch.Tensor:
    return p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad


def nudge_gradients(par: Parallel) -> None:
    """The `noise` fault: scale every local gradient by a few ULPs, as a nondeterministic kernel might."""
    for m in par.modules:
        for p in m.parameters():
            if p.grad is not None:
                g = _local_grad(p)
                g.mul_(1 + 4 * torch.finfo(g.dtype).eps)


def scale_grad(par: Parallel, param: str, factor: float) -> None:
    """The `scale_grad` fault: multiply the named parameter's gradient (every one for "*") by `factor`
    (before the norm and clip), on every rank holding a piece of it: a shard, a replica or a pipeline
    stage's copy."""
    for m in par.modules:
        for name, p in m.named_parameters():
            if param in (ALL_PARAMS, name.removeprefix("module.")) and p.grad is not None:
                _local_grad(p).mul_(factor)


def plant_shard_fault(par: Parallel, fault: str) -> None:
    """Corrupt rank 0's local shard of FAULT_PARAM in place, after training (loss and grad norm
    stay as they were): negate it, or write the shard's transpose back into its storage in
    row-major order (for a square shard exactly its transpose; for any shape a permutation of
    its elements, as a missing .t() in a shard copy would leave it). Negation leaves the norm's bits
    as they were, a permutation moves it by the rounding of its sum at most."""
    if dist.get_rank() != 0:
        return
    for m in par.modules:
        for name, p in m.named_parameters():
            if name.removeprefix("module.") != FAULT_PARAM:
                continue
            local = p.to_local() if hasattr(p, "to_local") else p
            with torch.no_grad():
                local.copy_(-local if fault == "negate_shard" else local.t().contiguous().view(local.shape))
            print(f"planted fault: {fault} on rank 0's shard {tuple(local.shape)} of {FAULT_PARAM}", flush=True)
            return
    raise RuntimeError(f"planted fault {fault}: rank 0 holds no {FAULT_PARAM}")
