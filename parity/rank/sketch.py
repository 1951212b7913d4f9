"""The digest of a parameter: L2 norm, sha256 of its bytes, and random-projection sketches.

The sketches can be computed from any box (shard) of the logical tensor and summed across ranks,
so a rank computes them from its local shard and the host computes them from a full tensor read
back from a checkpoint (parity.trainers): both give the same numbers up to float64 rounding.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from parity.core.records import SKETCH_COLUMNS
from parity.rank.hashing import key64, splitmix64

# Weight sketches: s_k = sum_i w_i * r_k(i) over the logical (global) tensor, where i is the
# row-major flat index into the global shape and r_k(i) = +-1 is bit k of splitmix64(i XOR a
# 64-bit key of the parameter's name). E[s_k^2] = ||w||^2, so the natural scale of a sketch is
# the parameter's norm, and a change that moves values between positions or flips their signs
# (a permutation, a transposed or negated shard) moves each s_k by about the norm of what
# changed, where the norm does not move at all. The signs depend on the global index only, so
# every layout of the same tensor has the same sketch up to float64 rounding of the sums.
# A change confined to one swapped pair of elements escapes one sign with probability 1/2 (the
# two signs agree), all four with 1/16; a change spread over many elements escapes with
# negligible odds.
SKETCHES = len(SKETCH_COLUMNS)
# _SIGNS[pattern, k] = r_k for an element whose hash's top bits are `pattern`: -1 where bit k
# (counted from the top) is set, else +1.
_SIGNS = np.array([[-1.0 if pattern >> (SKETCHES - 1 - k) & 1 else 1.0 for k in range(SKETCHES)]
                   for pattern in range(1 << SKETCHES)])
_SKETCH_CHUNK = 1 << 20  # elements hashed at a time: bounds the index temporaries on big shards


def sketch_block(name: str, block: torch.Tensor, offset, global_shape) -> np.ndarray:
    """SKETCHES float64 sums over one box of a parameter: `block` holds the global elements
    [offset[d], offset[d] + block.shape[d]) of every dim d of a tensor of shape `global_shape`."""
    if block.numel() == 0:  # an uneven split can leave a rank an empty shard
        return np.zeros(SKETCHES, dtype=np.float64)
    if block.dim() == 0:
        block, offset, global_shape = block.reshape(1), (0,), (1,)
    box = tuple(block.shape)
    values = block.detach().to("cpu", torch.float64).contiguous().numpy().reshape(box[0], -1)
    strides = [math.prod(global_shape[d + 1:]) for d in range(len(global_shape))]
    # Flat global index of every element of one box row (all dims but the first), row-major.
    tail = np.zeros((), dtype=np.uint64)
    for d in range(1, len(box)):
        tail = tail[..., None] + (np.arange(box[d], dtype=np.uint64) + np.uint64(offset[d])) * np.uint64(strides[d])
    tail = tail.reshape(-1)
    key = np.uint64(key64(name))
    # Elements are summed in 2^SKETCHES buckets by their sign pattern (the top SKETCHES bits of the
    # hash), then each sketch adds or subtracts the bucket sums: the same s_k, at one float64 sum
    # per element instead of SKETCHES.
    buckets = np.zeros(1 << SKETCHES, dtype=np.float64)
    step = max(1, _SKETCH_CHUNK // max(1, tail.size))  # box rows per chunk
    with np.errstate(over="ignore"):
        for start in range(0, box[0], step):
            rows = np.arange(start, min(start + step, box[0]), dtype=np.uint64) + np.uint64(offset[0])
            index = (rows * np.uint64(strides[0]))[:, None] + tail[None, :]
            pattern = (splitmix64(index.reshape(-1) ^ key) >> np.uint64(64 - SKETCHES)).astype(np.intp)
            buckets += np.bincount(pattern, weights=values[start:start + len(rows)].reshape(-1), minlength=len(buckets))
    return buckets @ _SIGNS


def param_order(name: str):
    parts = name.split(".")
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def norm_and_sha(name: str, full: torch.Tensor) -> dict:
    """The weights.csv row of a full (unsharded) tensor, less its sketches: float64 L2 norm, sha256 of the bytes."""
    full = full.detach().cpu().contiguous()
    return {"param": name, "norm": torch.linalg.vector_norm(full.double()).item(),
            "sha256": hashlib.sha256(full.view(torch.uint8).numpy().tobytes()).hexdigest()}


def tensor_digest(name: str, full: torch.Tensor) -> dict:
    """The whole weights.csv row of a full tensor (a rank sums sketches over shards instead)."""
    sketches = sketch_block(name, full, (0,) * full.dim(), tuple(full.shape))
    return {**norm_and_sha(name, full), **dict(zip(SKETCH_COLUMNS, sketches.tolist()))}


def state_dict_digest(state: dict) -> list[dict]:
    """weights.csv rows for every tensor of a full state dict, in parameter order."""
    return [tensor_digest(name, state[name]) for name in sorted(state, key=param_order)]
