"""The float64 oracle is float64 end to end: the harness's model and loss against an independent computation.

The reference below is written from the Llama-3 equations in plain torch, sharing no code with
parity.rank.model: RoPE as a complex multiply (as torchtitan writes it), attention with an explicit
causal softmax instead of SDPA, RMSNorm and SwiGLU spelled out, cross entropy from log_softmax.
Any op of the harness that silently ran in float32 would show up as a ~1e-8 relative error.
"""

import math

import torch

from parity.rank.data import synthetic_rows
from parity.rank.model import build_model
from parity.core.presets import PRESETS
from parity.rank.step import loss_fn

CFG = PRESETS["tiny"]
SEQ, BATCH = 16, 3


def reference_loss(w: dict, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hd = CFG.head_dim

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + CFG.norm_eps) * g

    theta = CFG.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs = torch.polar(torch.ones(SEQ, hd // 2, dtype=torch.float64),
                        torch.outer(torch.arange(SEQ, dtype=torch.float64), theta))

    def rope(x):  # (b, s, h, hd): interleaved pairs as complex numbers
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(z * freqs[None, :, None, :]).flatten(-2)

    h = w["tok_embeddings.weight"][tokens]
    mask = torch.full((SEQ, SEQ), -math.inf, dtype=torch.float64).triu(1)
    for i in range(CFG.n_layers):
        p = f"layers.{i}."
        x = rms(h, w[p + "attention_norm.weight"])
        q, k, v = (x @ w[p + f"attention.{n}.weight"].T for n in ("wq", "wk", "wv"))
        q, k, v = (t.view(BATCH, SEQ, CFG.n_heads, hd) for t in (q, k, v))
        q, k = rope(q), rope(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + mask
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(BATCH, SEQ, -1)
        h = h + att @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        gate = x @ w[p + "feed_forward.w1.weight"].T
        h = h + (gate * torch.sigmoid(gate) * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    logits = rms(h, w["norm.weight"]) @ w["output.weight"].T
    return -logits.log_softmax(-1).gather(-1, labels[..., None]).mean()


def test_float64_forward_and_backward_match_an_independent_computation():
    model = build_model(CFG, SEQ, seed=7, dtype=torch.float64)
    seq = torch.from_numpy(synthetic_rows(7, 1, range(BATCH), SEQ, CFG.vocab_size))
    tokens, labels = seq[:, :-1], seq[:, 1:]
    loss = loss_fn(model(tokens), labels)
    loss.backward()
    assert loss.dtype == torch.float64

    weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    expected = reference_loss(weights, tokens, labels)
    expected.backward()

    assert abs(loss.item() - expected.item()) <= 1e-12 * abs(expected.item())
    for name, p in model.named_parameters():
        want = weights[name].grad
        rel = (p.grad - want).norm().item() / want.norm().item()
        assert rel <= 1e-12, f"{name}: gradient off by {rel:.2e} relative"


def test_the_check_sees_a_float32_rounding():
    """The bound is tight enough to catch one op in float32: round the logits through float32 and it fails."""
    model = build_model(CFG, SEQ, seed=7, dtype=torch.float64)
    seq = torch.from_numpy(synthetic_rows(7, 1, range(BATCH), SEQ, CFG.vocab_size))
    tokens, labels = seq[:, :-1], seq[:, 1:]
    weights = {n: p.detach() for n, p in model.named_parameters()}
    exact = reference_loss(weights, tokens, labels).item()
    rounded = loss_fn(model(tokens).float().double(), labels).item()
    assert abs(rounded - exact) > 1e-12 * abs(exact)
