"""Model presets as plain numbers, so the case validator can check them without importing torch."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    ffn_hidden: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


PRESETS = {
    # torchtitan's llama3 debug model: dim 256, 6 layers, 16 heads, vocab 2048,
    # FFN hidden compute_ffn_hidden_dim(256, multiple_of=256) = 768, RoPE theta 500000.
    "debugmodel": ModelConfig(dim=256, n_layers=6, n_heads=16, vocab_size=2048, ffn_hidden=768),
    # Small enough for unit tests on 2 CPU cores; 4 layers so interleaved PP fits 2 ranks x 2 stages.
    "tiny": ModelConfig(dim=64, n_layers=4, n_heads=4, vocab_size=256, ffn_hidden=192),
    # Llama-3 shaped, 134M parameters (536 MB in float32, 2.1 GB with grads and AdamW state): big
    # enough that a rank holding a full copy instead of its shard shows in the recorded peak memory.
    "llama_134m": ModelConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, ffn_hidden=2048),
}


# The one home of the names probes and planted faults use; a test checks them against a built model.
def probe_modules(cfg: ModelConfig) -> list[str]:
    """The probed modules in forward execution order: the embeddings, per block its attention, its
    feed-forward and the block itself (its output), then the final norm and the output projection."""
    names = ["tok_embeddings"]
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.attention", f"layers.{i}.feed_forward", f"layers.{i}"]
    return names + ["norm", "output"]


def param_names(cfg: ModelConfig) -> list[str]:
    """parity.rank.model's named_parameters() names, in its order (the order modules are registered)."""
    block = ["attention_norm.weight", *(f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")),
             "ffn_norm.weight", *(f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3"))]
    names = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.{b}" for b in block]
    return names + ["norm.weight", "output.weight"]
