"""Per-rank work, entered through parity.rank: `python -m torch.distributed.run ... -m parity.rank PLAN.json`.

For each setup in the plan (all share this launch's world size), one after another: fresh mesh
and model, seed checkpoint loaded, N training steps, metrics, a weight digest and the logical
probes (parity.rank.probes) written by rank 0. This module records numbers; it never decides pass or fail.

Nothing in the step loop waits for the device: each step's loss and grad norm stay on it (as
tensors) and step times are device events, so the host queues steps ahead as a bare training
loop would. Everything is copied to the host once, after the last step, and then turned into
exactly the floats that were always recorded (NaN and Inf included, which the comparison fails).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parity.core import fingerprint

from parity.rank import memory

from parity.core import records
from parity.rank.data import Batches
from parity.core.lifeline import ERROR_MARK
from parity.rank.model import build_meta_model
from parity.rank.parallelize import Parallel, parallelize
from parity.rank.probes import ProbeRecorder
from parity.rank.shards import held_box, local_box
from parity.rank.sketch import SKETCHES, norm_and_sha, param_order, sketch_block
from parity.case.schema import ALL_PARAMS, Setup, Train

FAULT_RANK = 1  # the rank that hangs or crashes in the `hang` / `crash` fault setups
FAULT_STEP = 2  # the step of every planted fault
# The shard faults corrupt rank 0's local shard of this parameter after the last step. Every
# layout holds it on rank 0: layers.0 lives in the first pipeline stage, on pp rank 0.
FAULT_PARAM = "layers.0.feed_forward.w1.weight"
# The process group's own timeout fires this long after the launcher's: a hung collective is
# reported by the launcher, with every rank's log tail, not as a bare watchdog abort.
PG_TIMEOUT_MARGIN_S = 120.0
# The launcher polls the progress file 4 times a second. Writing it (a write and a rename) every
# step is host work inside the step that a small model on a GPU feels; twice a second is enough.
PROGRESS_EVERY_S = 0.5


def redirect_output(path: Path):
    """Send this rank's stdout/stderr (Python and C++ alike) to its own log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # the umask decides who may read it
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def setup_from_dict(d: dict) -> Setup:
    d = dict(d)
    return Setup(train=Train(**d.pop("train")), **d)


def sdpa_context(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    return sdpa_kernel([chosen])


def loss_fn(logits, labels):
    # At least float32 (bf16 logits are upcast, as torchtitan does); a float64 oracle stays float64.
    return F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), labels.flatten())


def _grad_groups(par: Parallel):
    """Parameters with gradients, grouped by DTensor mesh (clipping cannot mix meshes)."""
    groups: dict = {}
    for m in par.modules:
        for p in m.parameters():
            if p.grad is not None:
                groups.setdefault(getattr(p, "device_mesh", None), []).append(p)
    return list(groups.values())


def grad_norm_and_clip(par: Parallel, max_norm: float, device: torch.device, stage_local_clip: bool = False
                       ) -> torch.Tensor:
    """Total pre-clip L2 norm over the whole model, across DTensor meshes and pipeline stages, then clip.

    `stage_local_clip` plants a pipeline bug (the `local_clip` fault): each stage clips with its own
    stage's norm instead of the global one. The recorded norm stays the global one, so only what
    the clip does to the weights (when it engages) can reveal it.
    """
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    groups = _grad_groups(par)
    norms = []
    for params in groups:
        n = get_total_norm([p.grad for p in params], norm_type=2.0)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if len(norms) == 1 and par.pp_group is None:
        total = local = norms[0]  # no re-squaring: keeps the single-mesh norm exactly as torch computes it
    else:
        # At least float32 (bf16 norms are upcast); a float64 oracle's norm stays float64.
        sq = (torch.stack([n.to(torch.promote_types(n.dtype, torch.float32)) ** 2 for n in norms]).sum()
              if norms else torch.zeros((), device=device))
        local = sq.sqrt()
        if par.pp_group is not None:
            dist.all_reduce(sq, group=par.pp_group)
        total = sq.sqrt()
    if max_norm > 0:
        for params in groups:
            clip_grads_with_norm_(params, max_norm, local if stage_local_clip else total)
    return total.detach().clone()  # stays on the device; read once after the last step


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
    for a weights-ensemble member), or for the `skip_seed_load` fault a deterministic init that is not the seed's."""
    for m in modules:
        m.to_empty(device=device)
        m.init_buffers()
    if setup.fault == "skip_seed_load":
        fresh_init(modules, setup.train.seed)
    else:
        load_seed(modules, ckpt)
    if setup.perturb is not None:
        perturb_weights(modules, setup.perturb)


def _host_generator(*key) -> torch.Generator:
    """A CPU generator seeded by `key` and nothing else: the same draws on every rank and in every layout."""
    seed = int.from_bytes(hashlib.sha256("|".join(map(str, key)).encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)


def _held_part(p) -> tuple[torch.Tensor, tuple]:
    """(this rank's local tensor of p, the index of that part in p's full tensor): a shard, a stage's or all of it."""
    local, offset = held_box(p)
    return local, tuple(slice(o, o + n) for o, n in zip(offset, local.shape))


def perturb_weights(modules: list, member: int) -> None:
    """A weights-ensemble member's start: every loaded weight times (1 + eps z), z ~ N(0, 1) drawn on the host
    per full tensor from (member, parameter name), eps the weight dtype's machine epsilon. A few ULPs: the
    size of difference a changed reduction order leaves, here put into the weights. Each rank scales the
    part it holds, so a member starts from the same bits in every layout."""
    for m in modules:
        for name, p in m.named_parameters():
            local, part = _held_part(p)
            z = torch.randn(p.shape, generator=_host_generator("perturb", member, name.removeprefix("module.")))
            factor = 1 + torch.finfo(local.dtype).eps * z[part].to(local.dtype)  # drawn whole, used where held
            with torch.no_grad():
                local.mul_(factor.to(local.device))


def fresh_init(modules: list, seed: int) -> None:
    """The `skip_seed_load` fault's weights, the same in every layout: each parameter's full tensor is
    drawn on the host from a generator seeded by `seed` and its name (norm weights are ones), one
    parameter at a time, and each rank copies in the shard it holds."""
    for m in modules:
        for name, p in m.named_parameters():
            full = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=_host_generator(seed, name)) * 0.02
            local, part = _held_part(p)
            with torch.no_grad():
                local.copy_(full[part])


def load_seed(modules: list, ckpt: str):
    """DCP load into the (wrapped) model(s): each rank reads only what its shards hold."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    parts = [get_model_state_dict(m) for m in modules]
    merged = {k: v for part in parts for k, v in part.items()}  # stage FQNs are disjoint
    dcp.load(merged, checkpoint_id=ckpt)
    for m, part in zip(modules, parts):
        set_model_state_dict(m, {k: merged[k] for k in part})


def held_parameters(par: Parallel) -> dict:
    """This rank's parameters by model name (DDP's "module." prefix dropped; pipeline stages hold some only)."""
    return {name.removeprefix("module."): p for m in par.modules for name, p in m.named_parameters()}


def weight_digest(par: Parallel) -> list[dict]:
    """Per parameter of the full model: L2 norm (float64), sha256 of the full tensor's bytes, and
    SKETCHES random projections of the logical tensor computed from local shards (see weight_sketches).

    Norm and sha256 need the full tensor: parameter i of the model is assembled on rank i % world
    size alone (see full_on_one_rank), one parameter at a time, and one all_gather_object shares the
    rows.
    """
    local = held_parameters(par)
    boxes = {name: local_box(p, par) for name, p in local.items()}
    # What each rank holds: every parameter's shape and dtype, and the box it counts (None: none).
    held = {name: (tuple(p.shape), p.dtype, None if boxes[name] is None else
                   (tuple(boxes[name][0].shape), tuple(boxes[name][1]))) for name, p in local.items()}
    world = [None] * dist.get_world_size()
    dist.all_gather_object(world, held)  # pipeline stages hold different parameters
    order = sorted({n for part in world for n in part}, key=param_order)
    rows = {}
    for i, name in enumerate(order):
        full = full_on_one_rank(name, i % len(world), boxes.get(name), world)
        if full is not None:
            rows[name] = norm_and_sha(name, full)
            del full
    gathered = [None] * len(world)
    dist.all_gather_object(gathered, rows)
    merged = {}
    for part in gathered:
        merged.update(part)
    sketches = weight_sketches(par)
    return [{**merged[k], **dict(zip(records.SKETCH_COLUMNS, sketches[k]))} for k in order]


def collective_device() -> torch.device:
    """Where this process group's collectives take their tensors: the rank's GPU under nccl, else the host."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def full_on_one_rank(name: str, dst: int, box, world: list[dict]) -> torch.Tensor | None:
    """Parameter `name`'s full tensor on rank `dst` (None on every other rank): each rank
    sends the box it counts (shards.local_box) as raw bytes with one dist.gather, padded to the
    largest box (a rank without one sends padding only), and `dst` writes each box at its offset.
    Bytes, so that the tensor arrives bit for bit in any dtype. Where one rank's box is the whole
    parameter (DDP, replicate, a plain pipeline stage), that rank returns it instead: nothing moves."""
    shape, dtype = next(part[name][:2] for part in world if name in part)
    boxes = [part[name][2] if name in part else None for part in world]
    holders = [r for r, b in enumerate(boxes) if b is not None]
    if len(holders) == 1 and boxes[holders[0]][0] == shape:
        return box[0] if dist.get_rank() == holders[0] else None
    itemsize = dtype.itemsize
    size = max((math.prod(b[0]) * itemsize for b in boxes if b is not None), default=0)
    device = collective_device()
    send = torch.zeros(size, dtype=torch.uint8, device=device)
    if box is not None:
        block = box[0].detach().contiguous().reshape(-1).view(torch.uint8)
        send[:block.numel()].copy_(block)
    rank = dist.get_rank()
    recv = [torch.empty_like(send) for _ in world] if rank == dst else None
    dist.gather(send, recv, dst=dst)
    if rank != dst:
        return None
    full = torch.zeros(shape, dtype=dtype)
    for piece, b in zip(recv, boxes):
        if b is not None:
            block_shape, offset = b
            n = math.prod(block_shape) * itemsize
            full[tuple(slice(o, o + k) for o, k in zip(offset, block_shape))] = piece[:n].cpu().view(dtype).view(block_shape)
    return full


def weight_sketches(par: Parallel) -> dict[str, list[float]]:
    """param name -> SKETCHES floats, the same on every rank, from local shards only (no gather).

    Each rank sums its own boxes into a [n_params, SKETCHES + 2] float64 table (zeros for the
    parameters it does not hold or does not count); one all_reduce(SUM) adds the ranks up. Two
    more columns check that every element was counted exactly once: the number of elements
    counted must be numel, and the sum of their flat indices must be 0 + 1 + ... + (numel - 1)
    (modulo a prime, so that the float64 sum stays exact). A box at a wrong offset, or two ranks
    counting the same box, changes the index sum.
    """
    local = held_parameters(par)
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(local))  # pipeline stages hold different parameters
    order = sorted({n for part in names for n in part}, key=param_order)
    count, index_sum = SKETCHES, SKETCHES + 1
    table = torch.zeros(len(order), SKETCHES + 2, dtype=torch.float64)
    for row, name in enumerate(order):
        if name not in local:
            continue
        p = local[name]
        box = local_box(p, par)
        if box is not None:
            block, offset = box
            table[row, :SKETCHES] = torch.from_numpy(sketch_block(name, block, offset, tuple(p.shape)))
            table[row, count] = block.numel()
            table[row, index_sum] = _box_index_sum(tuple(block.shape), offset, tuple(p.shape)) % _INDEX_PRIME
    device = collective_device()
    table = table.to(device)
    dist.all_reduce(table)
    table = table.cpu()
    for row, name in enumerate(order):  # every parameter is held, and so checked, on some rank
        n = local[name].numel() if name in local else None
        if n is not None and (table[row, count].item() != n
                              or int(table[row, index_sum].item()) % _INDEX_PRIME != (n * (n - 1) // 2) % _INDEX_PRIME):
            raise RuntimeError(f"weight sketch of {name}: the ranks' shards do not cover its {n} elements exactly once "
                               f"({table[row, count].item():.0f} counted)")
    return {name: table[row, :SKETCHES].tolist() for row, name in enumerate(order)}


_INDEX_PRIME = 2**31 - 1  # a world of up to 2^21 ranks sums residues below 2^52: exact in float64


def _box_index_sum(box, offset, global_shape) -> int:
    """Sum of the row-major flat global indices of a box's elements, in exact integers."""
    if not global_shape:
        return 0
    total, numel = 0, math.prod(box)
    for d, (n, o) in enumerate(zip(box, offset)):
        stride = math.prod(global_shape[d + 1:])
        # Each index along dim d, (o + 0) ... (o + n - 1), appears numel / n times.
        total += stride * (n * o + n * (n - 1) // 2) * (numel // n) if n else 0
    return total


def to_device(array, device: torch.device) -> torch.Tensor:
    """A host batch on the device without waiting for it: a copy from pageable memory would
    synchronize the stream, i.e. wait for every step still queued."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def nudge_gradients(par: Parallel) -> None:
    """The `noise` fault: scale every local gradient by a few ULPs, as a nondeterministic kernel might."""
    for m in par.modules:
        for p in m.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                g.mul_(1 + 4 * torch.finfo(g.dtype).eps)


class StepClock:
    """Step boundaries: CUDA events on the current stream (no host sync), else the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Time between consecutive marks (waits for the last one)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def global_losses(par: Parallel, local: list[float | None]) -> list[float]:
    """Per step: the mean over data-parallel ranks of their local mean losses, summed in float64 in dp-rank order."""
    holder = local[0] is not None and par.tp_rank == 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (par.dp_rank, local if holder else None))  # once per run, not per step
    by_rank = {r: v for r, v in gathered if v is not None}
    return [math.fsum(by_rank[r][i] for r in sorted(by_rank)) / len(by_rank) for i in range(len(local))]


def train_setup(setup: Setup, job: dict, device: torch.device) -> dict:
    t = setup.train
    cfg = t.model_config
    rank = dist.get_rank()
    fault = setup.fault
    timings: dict[str, float] = {}
    began = time.perf_counter()
    memory.reset_peak(device)  # after the previous setup in this process has been let go
    model, par = build_parallel(setup, job["seed_checkpoint"], device, timings)
    if fault == "scale_output":  # before the probes' hooks, which must see the scaled output
        scale_output(par, setup.fault_at, setup.fault_factor)
    # No recorder, no hooks: a run without probes computes exactly what it always did.
    probes = (ProbeRecorder(model, par, cfg, t.global_batch, t.seq_len, job["probe_steps"], device)
              if job["probe_steps"] else None)
    params = [p for m in par.modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=t.weight_decay, foreach=False)
    batches = Batches(t.seed, t.global_batch, t.seq_len, cfg.vocab_size, t.data)
    dp_rank = 0 if fault == "replicated_data" else par.dp_rank
    lrs, micro_losses, norms = [], [], []
    clock = StepClock(device)
    last_progress = -math.inf
    # The meta model, probes and optimizer: what build_parallel's own two parts leave.
    timings["build_s"] = time.perf_counter() - began - timings["seed_load_s"] - timings["parallelize_s"]
    began = time.perf_counter()
    for step in range(1, t.steps + 1):
        if fault in ("hang", "crash") and rank == FAULT_RANK and step == FAULT_STEP:
            if fault == "crash":
                raise RuntimeError(f"planted fault: rank {rank} crashes at step {step}")
            print(f"planted fault: rank {rank} hangs at step {step}", flush=True)
            time.sleep(10**6)
        clock.mark()
        probing = probes is not None and probes.start(step)
        lr = t.lr * min(1.0, step / max(t.warmup_steps, 1))  # linear warmup; step 1 already trains
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, labels = (to_device(a, device) for a in batches.local(step, setup.dp_degree, dp_rank))
        with sdpa_context(t.attention):
            micro_losses.append(forward_backward(par, setup, inputs, labels))
        if fault == "noise" and setup.repeat and step == FAULT_STEP:
            nudge_gradients(par)
        if fault == "scale_grad":
            scale_grad(par, setup.fault_at, setup.fault_factor)
        if probing:
            probes.record_grads()
        norms.append(grad_norm_and_clip(par, t.max_norm, device, stage_local_clip=fault == "local_clip"))
        if probing:
            probes.before_update()
        opt.step()
        if probing:
            probes.after_update(step)
        opt.zero_grad(set_to_none=True)
        lrs.append(lr)
        if rank == 0 and (step == t.steps or time.monotonic() - last_progress >= PROGRESS_EVERY_S):
            write_progress(job, setup, step, t.steps)  # steps queued; the device may still be working on them
            last_progress = time.monotonic()
    clock.mark()
    # The one copy to the host. .tolist() yields the same doubles .item() did, step by step.
    times = clock.seconds()
    timings["steps_s"] = time.perf_counter() - began
    norm_values = torch.stack(norms).tolist()
    local = [None if ls is None else math.fsum(torch.stack(ls).tolist()) / setup.microbatches for ls in micro_losses]
    losses = global_losses(par, local)
    probe_rows = probes.rows() if probes is not None else None
    rows = [{"step": i + 1, "loss": losses[i], "grad_norm": norm_values[i], "lr": lrs[i],
             "tokens": t.global_batch * t.seq_len, "step_time_s": times[i]} for i in range(t.steps)]
    if rank == 0:
        for r in rows:
            print(f"step {r['step']}: loss {r['loss']!r} grad_norm {r['grad_norm']!r} lr {r['lr']!r} "
                  f"time {r['step_time_s']:.4f}s", flush=True)
    if fault in ("negate_shard", "transpose_shard"):
        plant_shard_fault(par, fault)
    began = time.perf_counter()
    digest = weight_digest(par)
    timings["digest_s"] = time.perf_counter() - began
    return {"rows": rows, "digest": digest, "par": par, "probes": probe_rows, "timings": timings,
            "peak_memory": peak_memory(device)}


def peak_memory(device: torch.device) -> dict | None:
    """run.json's peak_memory: every rank's peak since the setup's start (one all_gather_object)."""
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, memory.peak_bytes(device))
    if None in per_rank:
        return None
    return {"measure": memory.measure(device), "per_rank_bytes": per_rank, "max_bytes": max(per_rank)}


def scale_output(par: Parallel, module: str, factor: float) -> None:
    """The `scale_output` fault: multiply the named module's output by `factor` in every forward. Whatever
    this rank holds of it is scaled: a TP sequence shard or replicated copy, the module on its pipeline
    stage; a rank without the module does nothing."""
    for m in par.modules:
        for name, mod in m.named_modules():
            if name.removeprefix("module.") == module:
                mod.register_forward_hook(lambda mod, args, out: out * factor)


def scale_grad(par: Parallel, param: str, factor: float) -> None:
    """The `scale_grad` fault: multiply the named parameter's gradient (every one for "*") by `factor`
    (before the norm and clip), on every rank holding a piece of it: a shard, a replica or a pipeline
    stage's copy."""
    for m in par.modules:
        for name, p in m.named_parameters():
            if param in (ALL_PARAMS, name.removeprefix("module.")) and p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                g.mul_(factor)


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


def forward_backward(par: Parallel, setup: Setup, inputs, labels) -> list[torch.Tensor] | None:
    """This rank's per-microbatch losses, left on the device (None where no loss lives: non-last PP stages)."""
    n = setup.microbatches
    if par.schedule is not None:
        losses = [] if par.has_last_stage else None
        target = labels if par.has_last_stage else None
        if par.has_first_stage:
            par.schedule.step(inputs, target=target, losses=losses)
        else:
            par.schedule.step(target=target, losses=losses)
        return [l.detach() for l in losses] if losses is not None else None
    model = par.modules[0]
    total = []
    for x, y in zip(inputs.chunk(n), labels.chunk(n)):
        loss = loss_fn(model(x), y)
        (loss / n if n > 1 else loss).backward()
        total.append(loss.detach())
    return total


def write_progress(job: dict, setup: Setup, step: int, total: int):
    """The launch's one-line progress file: the launcher draws it, and restarts a setup's timeout when it names a new one."""
    path = Path(job["progress"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"case": job["case"], "setup": setup.name, "step": step, "steps": total}))
    os.replace(tmp, path)


def write_outputs(setup: Setup, job: dict, result: dict, started: str, device: torch.device, determinism: dict,
                  timings: dict):
    par = result["par"]
    out = records.setup_dir(job["out"], job["case"], setup.name)
    fp = fingerprint.fingerprint(device)
    records.write_metrics(out / "metrics.csv", result["rows"])
    records.write_weights(out / "weights.csv", result["digest"])
    if result["probes"] is not None:
        records.write_probes(out / "probes.csv", result["probes"])
    records.write_json(out / "run.json", {
        **job["provenance"],
        "case": job["case"],
        "setup": setup.name,
        "status": "ok",
        "device": fp.get("gpu", "cpu"),
        "platform": fp["platform"],
        "backend": dist.get_backend(),
        "fingerprint": fp,
        "determinism": determinism,
        "pg_timeout_s": job["timeout_s"] + PG_TIMEOUT_MARGIN_S,
        "world_size": dist.get_world_size(),
        "mesh_shape": par.mesh_shape,
        "mesh_dim_names": par.mesh_dim_names,
        "setup_config": {k: v for k, v in setup.to_dict().items() if k != "train"},
        "train": setup.to_dict()["train"],
        "notes": par.notes,
        "timings": timings,
        "peak_memory": result["peak_memory"],
        "started": started,
        "ended": datetime.now(timezone.utc).isoformat(),
    })


def main(plan_path: str, rank_started: float | None = None) -> int:
    """Train every job of the plan in turn. `rank_started`: time.time() when this rank's interpreter began."""
    imported = time.time()
    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ["RANK"])
    shared = {k: plan[k] for k in ("out", "progress", "timeout_s")}
    jobs = [{**entry, **shared} for entry in plan["jobs"]]
    setups = [setup_from_dict(j["setup"]) for j in jobs]

    def log_to(job, setup):
        redirect_output(records.setup_dir(plan["out"], job["case"], setup.name) / f"rank{rank}.log")

    log_to(jobs[0], setups[0])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    determinism = fingerprint.apply_determinism(plan["determinism"])  # before CUDA and NCCL start
    timeout = timedelta(seconds=plan["timeout_s"] + PG_TIMEOUT_MARGIN_S)
    if plan["device"] == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    # Where this launch's start-up went, across its ranks (every setup of the launch records it): until
    # the first rank's interpreter started, until the last rank had imported torch, until the group formed.
    starts = [None] * dist.get_world_size()
    dist.all_gather_object(starts, (rank_started or imported, imported))
    formed = time.time()
    first_start, last_import = min(s for s, _ in starts), max(i for _, i in starts)
    launch_timings = {"torchrun_start_s": first_start - plan["launched_at"], "rank_imports_s": last_import - first_start,
                      "process_group_s": formed - last_import}
    current = f"{jobs[0]['case']}/{setups[0].name}"
    try:
        for job, setup in zip(jobs, setups):
            current = f"{job['case']}/{setup.name}"
            log_to(job, setup)
            print(f"== setup {setup.name} of case {job['case']} (rank {rank} of {dist.get_world_size()}) ==",
                  flush=True)
            if rank == 0:
                write_progress(job, setup, 0, setup.train.steps)  # the launcher starts this setup's clock
            dist.barrier()
            started = datetime.now(timezone.utc).isoformat()
            began = time.perf_counter()
            result = train_setup(setup, job, device)
            if rank == 0:
                timings = {**launch_timings, **result["timings"], "setup_s": time.perf_counter() - began}
                write_outputs(setup, job, result, started, device, determinism, timings)
            del result
            dist.barrier()
    except BaseException as e:  # noqa: BLE001 - report any failure in a form the launcher can find
        traceback.print_exc()
        # The time lets the launcher name the first failure: peers then fail on closed connections.
        print(f"{ERROR_MARK} {time.time():.6f} setup {current} rank {rank}: {type(e).__name__}: {e}", flush=True)
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    # Skip interpreter teardown: destroying gloo groups can hang; every rank passed the last barrier.
    os._exit(0)
