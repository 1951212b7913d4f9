"""Keyed hashes that give the same numbers on every rank, machine and layout: no RNG state, no salt.

- splitmix64: a 64-bit mix of numpy uint64 arrays, elementwise (the synthetic token stream of
  parity.rank.data and the weight sketches' signs in parity.rank.sketch);
- key64: a string's 64-bit key, the first 8 bytes of its sha256 (little-endian);
- host_generator: a CPU torch.Generator seeded by key64 of a tuple (a weights-ensemble member's
  perturbation, the skip_seed_load fault's init).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of x + the golden-ratio increment, in uint64 arithmetic that wraps
    (callers silence numpy's overflow warning)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key64(text: str) -> int:
    """The first 8 bytes of text's sha256, little-endian. Not Python's hash(): that is salted per process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def host_generator(*key) -> torch.Generator:
    """A CPU generator seeded by `key` and nothing else: the same draws on every rank and in every layout."""
    return torch.Generator().manual_seed(key64("|".join(map(str, key))))
