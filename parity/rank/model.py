"""A Llama-3-style decoder in torchtitan's layout, knowing nothing of parallelism.

Parameter names match torchtitan's llama3 (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, norm, output), so TP plans and checkpoints written for torchtitan apply.
A pipeline stage is this same module with the layers it does not own deleted and
tok_embeddings / norm / output set to None; forward() skips whatever is None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parity.core.presets import ModelConfig


def rope_tables(cfg: ModelConfig, seq_len: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of torchtitan's precompute_freqs_cis, as real tables (seq_len, head_dim // 2).

    float32, as torchtitan computes them, for every training dtype but float64: a float64 oracle
    must not carry a float32 rounding of its rotation angles.
    """
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2)[: cfg.head_dim // 2].to(dtype) / cfg.head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=dtype), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) as torchtitan's complex multiply does; x: (bs, seq, heads, head_dim)."""
    # At least float32, as torchtitan rotates; float64 (the oracle) stays float64.
    pairs = x.to(torch.promote_types(cos.dtype, torch.float32)).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, : x.shape[1], None, :], sin[None, : x.shape[1], None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        bs, seq, _ = x.shape
        # view(..., -1, head_dim): under tensor parallel each rank holds n_heads / tp heads.
        q = apply_rope(self.wq(x).view(bs, seq, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(bs, seq, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(bs, seq, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bs, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_len: int, rope_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.seq_len, self.rope_dtype = seq_len, rope_dtype
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed "0".."n-1" keeps FQNs stable when a pipeline stage deletes layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, seq_len, rope_dtype)
        # Not persistent: derived from the config, so not part of the checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_buffers(self):
        """Recompute the RoPE tables in place (cast to the buffers' dtype): after to_empty they hold garbage,
        and the seed checkpoint does not carry them."""
        cos, sin = rope_tables(self.cfg, self.seq_len, self.rope_dtype)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self):
        """torchtitan-style init: normal(0.02); output and residual projections scaled down with depth."""
        nn.init.normal_(self.tok_embeddings.weight)
        for i, layer in enumerate(self.layers.values()):
            depth_std = 0.02 / math.sqrt(2 * (i + 1))
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1):
                nn.init.trunc_normal_(lin.weight, std=0.02)
            for lin in (layer.attention.wo, layer.feed_forward.w2, layer.feed_forward.w3):
                nn.init.trunc_normal_(lin.weight, std=depth_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        std = self.cfg.dim**-0.5
        nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)


def build_model(cfg: ModelConfig, seq_len: int, seed: int, dtype: torch.dtype = torch.float32) -> Transformer:
    """Deterministic on every machine: init in float32 on CPU from `seed`, then cast."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Transformer(cfg, seq_len, _rope_dtype(dtype))
    model.init_weights()
    torch.random.set_rng_state(gen_state)
    return model.to(dtype)


def build_meta_model(cfg: ModelConfig, seq_len: int, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model's structure without storage: parallelize it first, so that each rank allocates only
    what it holds (to_empty), then load the weights and call init_buffers."""
    with torch.device("meta"):
        model = Transformer(cfg, seq_len, _rope_dtype(dtype))
    return model.to(dtype)


def _rope_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
