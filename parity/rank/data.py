"""A deterministic, machine-independent token stream, and its split by data-parallel rank.

Each row is an arithmetic progression modulo the vocabulary (random start, stride 1..16) with
5% of tokens replaced by noise. A model learns "next = previous + stride" within a few steps,
so the loss falls visibly in a 10-step run. Every number comes from a splitmix64 hash of
(seed, step, row, position) in numpy uint64 arithmetic: no RNG state, no platform dependence,
and any rank can produce any row without the others.
"""

from __future__ import annotations

import numpy as np

from parity.core.tokens import load_token_file
from parity.rank.hashing import splitmix64


def _hash(seed: int, step: int, rows: np.ndarray, cols: np.ndarray, salt: int) -> np.ndarray:
    key = np.uint64((seed * 1_000_003 + step * 7_919 + salt) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        h = splitmix64(np.uint64(key) ^ splitmix64(rows.astype(np.uint64) * np.uint64(0x100000001B3)))
        return splitmix64(h ^ cols.astype(np.uint64))


def synthetic_rows(seed: int, step: int, rows: range, seq_len: int, vocab: int) -> np.ndarray:
    """Rows `rows` of the global batch of `step` (1-based): int64 array (len(rows), seq_len + 1)."""
    r = np.asarray(rows, dtype=np.int64)[:, None]
    pos = np.arange(seq_len + 1, dtype=np.int64)[None, :]
    zero = np.zeros_like(r)
    start = (_hash(seed, step, r, zero, 1) % np.uint64(vocab)).astype(np.int64)
    stride = (_hash(seed, step, r, zero, 2) % np.uint64(16)).astype(np.int64) + 1
    tokens = (start + stride * pos) % vocab
    noise_at = (_hash(seed, step, r, pos, 3) % np.uint64(100)) < np.uint64(5)
    noise = (_hash(seed, step, r, pos, 4) % np.uint64(vocab)).astype(np.int64)
    return np.where(noise_at, noise, tokens)


def file_rows(tokens: np.ndarray, step: int, rows: range, global_batch: int, seq_len: int) -> np.ndarray:
    """Windows of seq_len + 1 tokens from a user token file, consumed in order and wrapped around."""
    n = len(tokens) - (seq_len + 1)
    starts = [(((step - 1) * global_batch + row) * seq_len) % max(n, 1) for row in rows]
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)


def rank_rows(global_batch: int, dp_degree: int, dp_rank: int) -> range:
    """Every setup splits the global batch the same way: dp rank r takes rows [r*b, (r+1)*b)."""
    b = global_batch // dp_degree
    return range(dp_rank * b, (dp_rank + 1) * b)


class Batches:
    """The (inputs, labels) of one data-parallel rank for each step."""

    def __init__(self, seed: int, global_batch: int, seq_len: int, vocab: int, path: str | None = None):
        self.seed, self.global_batch, self.seq_len, self.vocab = seed, global_batch, seq_len, vocab
        self.tokens = load_token_file(path, seq_len, vocab) if path else None

    def rows(self, step: int, rows: range) -> np.ndarray:
        if self.tokens is None:
            return synthetic_rows(self.seed, step, rows, self.seq_len, self.vocab)
        return file_rows(self.tokens, step, rows, self.global_batch, self.seq_len)

    def local(self, step: int, dp_degree: int, dp_rank: int) -> tuple[np.ndarray, np.ndarray]:
        seq = self.rows(step, rank_rows(self.global_batch, dp_degree, dp_rank))
        # Contiguous copies: torch.distributed.pipelining in torch 2.11 checks input strides against
        # its shape inference and rejects a (seq_len + 1)-strided slice.
        return np.ascontiguousarray(seq[:, :-1]), np.ascontiguousarray(seq[:, 1:])
