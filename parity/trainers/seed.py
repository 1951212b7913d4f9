"""Parity's own model's seed checkpoint: built once per (model preset, seed, dtype) in one process, kept in
the seed cache (parity.trainers.seed_cache).

The build is byte-for-byte deterministic (parity.trainers.seed_cache.deterministic_writer), so a
rebuilt entry keeps its hash.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

from parity.core.presets import PRESETS
from parity.trainers.seed_cache import SeedInfo, cached_build, deterministic_writer, external_seed


def cache_key(model: str, seed: int, dtype: str) -> str:
    # The config's numbers go into the key so a changed preset never reuses a stale checkpoint.
    cfg = json.dumps(asdict(PRESETS[model]), sort_keys=True)
    digest = hashlib.sha256(f"{cfg}|{seed}|{dtype}".encode()).hexdigest()[:16]
    return f"{model}-seed{seed}-{dtype}-{digest}"


def resolve_seed(model: str, seed: int, dtype: str, cache: Path | None = None,
                 external: Path | None = None) -> SeedInfo:
    """The checkpoint to load and its content hash, checked now, before any rank starts.

    With `external` (a case's own seed_checkpoint), that directory is hashed and its metadata read;
    anything wrong with it is an InputError. Otherwise the cached build for (model, seed, dtype),
    verified against its name, and rebuilt (with a note saying so) if missing or damaged.
    """
    if external is not None:
        return external_seed(Path(external))
    return cached_build(cache, cache_key(model, seed, dtype), f"seed cache: {model} seed {seed} {dtype}",
                        lambda tmp: save_model_seed(tmp, model, seed, dtype))


def save_model_seed(tmp: Path, model: str, seed: int, dtype: str) -> None:
    """Build the preset's model from `seed` in this process and save its weights into `tmp`."""
    # torch loads here, where a seed is built, not for every command that loads the trainer registry.
    import torch
    import torch.distributed.checkpoint as dcp

    import parity.rank.model

    # seq_len 1: the RoPE tables are derived buffers, not part of the checkpoint
    state = parity.rank.model.build_model(PRESETS[model], 1, seed, getattr(torch, dtype)).state_dict()
    with warnings.catch_warnings():  # "assuming ... single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=deterministic_writer(str(tmp)))


def state_dict_sha256(state_dict) -> str:
    """Hash of names, dtypes, shapes and bytes, in sorted name order: equal iff the weights are equal."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
