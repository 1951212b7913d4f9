"""Model presets, the token stream and the record files' exact round trip (the seed cache: test_seed_cache)."""

import math
import os
import struct

import numpy as np
import pytest
import torch

from parity.core import records
from parity.rank.data import Batches, rank_rows, synthetic_rows
from parity.rank.model import build_model
from parity.core.presets import PRESETS
from parity.trainers.seed import state_dict_sha256


def test_debugmodel_matches_torchtitan_debug_shapes():
    m = build_model(PRESETS["debugmodel"], 16, seed=0)
    sd = m.state_dict()
    assert sd["tok_embeddings.weight"].shape == (2048, 256)
    assert sd["layers.5.attention.wq.weight"].shape == (256, 256)
    assert sd["layers.0.feed_forward.w1.weight"].shape == (768, 256)
    assert sd["output.weight"].shape == (2048, 256)
    assert "layers.6.attention.wq.weight" not in sd
    assert not any("rope" in k for k in sd)  # RoPE tables are derived, not checkpointed
    assert PRESETS["debugmodel"].rope_theta == 500000.0


def test_model_is_deterministic_and_causal():
    cfg = PRESETS["tiny"]
    a, b = build_model(cfg, 16, seed=1), build_model(cfg, 16, seed=1)
    assert state_dict_sha256(a.state_dict()) == state_dict_sha256(b.state_dict())
    assert state_dict_sha256(a.state_dict()) != state_dict_sha256(build_model(cfg, 16, seed=2).state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % cfg.vocab_size
    out_x, out_y = a(x), a(y)
    assert out_x.shape == (2, 16, cfg.vocab_size)
    assert torch.equal(out_x[:, :10], out_y[:, :10])  # later tokens never influence earlier positions
    assert not torch.equal(out_x[:, 10:], out_y[:, 10:])


def test_data_is_deterministic_and_learnable_shape():
    a = synthetic_rows(42, 3, range(16), 32, 2048)
    assert a.shape == (16, 33) and a.dtype == np.int64
    assert np.array_equal(a, synthetic_rows(42, 3, range(16), 32, 2048))
    assert not np.array_equal(a, synthetic_rows(42, 4, range(16), 32, 2048))
    assert not np.array_equal(a, synthetic_rows(43, 3, range(16), 32, 2048))
    assert a.min() >= 0 and a.max() < 2048
    # mostly an arithmetic progression: the stride repeats in >= 80% of positions
    d = np.diff(a, axis=1) % 2048
    assert (d == d[:, [0]]).mean() > 0.8 or (d == np.median(d, axis=1, keepdims=True)).mean() > 0.8
    # Pinned values: pure uint64 arithmetic must give these on every machine, CI's included.
    assert synthetic_rows(42, 1, range(1), 8, 2048)[0].tolist() == [234, 247, 260, 273, 286, 299, 312, 325, 338]
    assert synthetic_rows(7, 5, range(3, 4), 12, 256)[0].tolist() == [70, 83, 96, 109, 122, 135, 148, 161, 174, 187,
                                                                      200, 213, 226]


def test_rank_split_tiles_the_global_batch():
    b = Batches(7, 16, 32, 256)
    full = b.rows(2, range(16))
    for dp in (1, 2, 4, 8, 16):
        parts = [np.concatenate([x[:, :1], y], axis=1) for x, y in (b.local(2, dp, r) for r in range(dp))]
        assert np.array_equal(np.concatenate(parts), full)
    assert rank_rows(16, 4, 3) == range(12, 16)


def test_token_file_replaces_the_generator(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(1000, dtype=np.int32) % 256)
    x, y = Batches(0, 4, 16, 256, str(path)).local(1, 2, 1)
    assert x.shape == (2, 16) and np.array_equal(y[:, :-1], x[:, 1:])
    np.save(path, np.arange(10) + 300)
    with pytest.raises(ValueError, match=r"ids in \[0, 256\)"):
        Batches(0, 4, 8, 256, str(path))


def test_metrics_round_trip_is_bit_exact(tmp_path):
    values = [0.1 + 0.2, 1e-300, 5e-324, 8.074956953525543, math.pi, float("nan"), float("inf"), -0.0]
    rows = [{"step": i + 1, "loss": v, "grad_norm": v / 3, "lr": 8e-4, "tokens": 2048, "step_time_s": 0.5}
            for i, v in enumerate(values)]
    records.write_metrics(tmp_path / "m.csv", rows)
    back = records.read_metrics(tmp_path / "m.csv")
    bits = lambda x: struct.pack("<d", x)  # noqa: E731
    assert [bits(r["loss"]) for r in back] == [bits(v) for v in values]
    assert [bits(r["grad_norm"]) for r in back] == [bits(r["grad_norm"]) for r in rows]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_corrupt_metrics_names_file_and_line(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("step,loss,grad_norm,lr,tokens,step_time_s\n1,8.0,0.3,1e-3,10,0.1\n2,eight,0.3,1e-3,10,0.1\n")
    with pytest.raises(records.RecordError, match=rf"{p}:3: column 'loss'"):
        records.read_metrics(p)
