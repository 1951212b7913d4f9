"""A distributed model's weights.csv rows, computed on every rank: per parameter of the full model, the
float64 L2 norm and the sha256 of the full tensor's bytes (parameter i assembled on rank i % world
size alone), and the random-projection sketches summed over the ranks' local shards (parity.rank.sketch).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parity.core import records
from parity.rank.parallelize import Parallel
from parity.rank.shards import local_box
from parity.rank.sketch import SKETCHES, norm_and_sha, param_order, sketch_block

_INDEX_PRIME = 2**31 - 1  # a world of up to 2^21 ranks sums residues below 2^52: exact in float64


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
            table[row, index_sum] = box_index_sum(tuple(block.shape), offset, tuple(p.shape)) % _INDEX_PRIME
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


def box_index_sum(box, offset, global_shape) -> int:
    """Sum of the row-major flat global indices of a box's elements, in exact integers."""
    if not global_shape:
        return 0
    total, numel = 0, math.prod(box)
    for d, (n, o) in enumerate(zip(box, offset)):
        stride = math.prod(global_shape[d + 1:])
        # Each index along dim d, (o + 0) ... (o + n - 1), appears numel / n times.
        total += stride * (n * o + n * (n - 1) // 2) * (numel // n) if n else 0
    return total
