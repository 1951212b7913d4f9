"""The seed checkpoint: built once per (model preset, seed, dtype) in one process, cached by content hash.

Layout of the cache (default ~/.cache/parity/seeds, or $PARITY_CACHE, or --cache):
    <cache>/<sha256>/            a torch.distributed.checkpoint directory, named by its content hash
    <cache>/keys/<key>.txt       which hash a (preset, config, seed, dtype) key resolved to
Concurrent builders (pytest-xdist workers) serialise on an fcntl lock; the checkpoint is written
to a temporary directory and renamed, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from parity.presets import PRESETS


def default_cache() -> Path:
    if os.environ.get("PARITY_CACHE"):
        return Path(os.environ["PARITY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "parity" / "seeds"


@contextmanager
def _locked(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def state_dict_sha256(state_dict) -> str:
    """Hash of names, dtypes, shapes and bytes, in sorted name order: equal iff the weights are equal."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model: str, seed: int, dtype: str) -> str:
    # The config's numbers go into the key so a changed preset never reuses a stale checkpoint.
    cfg = json.dumps(asdict(PRESETS[model]), sort_keys=True)
    digest = hashlib.sha256(f"{cfg}|{seed}|{dtype}".encode()).hexdigest()[:16]
    return f"{model}-seed{seed}-{dtype}-{digest}"


def seed_checkpoint(model: str, seed: int, dtype: str, cache: Path | None = None) -> tuple[Path, str, bool]:
    """Returns (checkpoint dir, content sha256, created now?). Creates it on a cache miss."""
    cache = Path(cache) if cache else default_cache()
    key_file = cache / "keys" / f"{cache_key(model, seed, dtype)}.txt"
    with _locked(cache):
        if key_file.is_file():
            sha = key_file.read_text().strip()
            if (cache / sha / ".metadata").is_file():
                return cache / sha, sha, False
        import torch
        import torch.distributed.checkpoint as dcp

        from parity.model import build_model

        # seq_len 1: the RoPE tables are derived buffers, not part of the checkpoint
        state = build_model(PRESETS[model], 1, seed, getattr(torch, dtype)).state_dict()
        sha = state_dict_sha256(state)
        final = cache / sha
        if not (final / ".metadata").is_file():
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".building-"))
            try:
                with warnings.catch_warnings():  # "assuming ... single process": that is the intent
                    warnings.simplefilter("ignore", UserWarning)
                    dcp.save(state, checkpoint_id=str(tmp))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        key_file.parent.mkdir(parents=True, exist_ok=True)
        tmp_key = key_file.with_suffix(".tmp")
        tmp_key.write_text(sha + "\n")
        os.replace(tmp_key, key_file)
        return final, sha, True


def checkpoint_sha256(path: Path) -> str:
    """Content hash of an existing DCP checkpoint (for user-supplied seeds), loaded in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/seed.pt")
        import torch

        state = torch.load(f"{tmp}/seed.pt", weights_only=True)
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    return state_dict_sha256({k: v for k, v in state.items() if hasattr(v, "view")})
