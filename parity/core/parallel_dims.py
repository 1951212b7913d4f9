"""The parallelism rules, in one place (in the spirit of torchtitan's ParallelDims).

Two readers use this module and nothing else for these rules:
- the case validator (`parity.case.rules`) calls `problems()` and turns the first one into a one-line
  SpecError, so a combination that would not build what it says is rejected before any process
  starts;
- the mesh builder (`parity.rank.parallelize`) asks `ParallelDims` which mesh dims exist and which
  wrapper applies on which of them.

A rule written once here cannot drift between "what validation allows" and "what gets built".
No torch import: the validator must stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "tp")  # torchtitan's order, outermost first
MAX_WORLD_SIZE = 1024  # far above any parity case; far below a count that would fork-bomb a workstation
# The FSDP2-based wrappers: the only ones that take a MixedPrecisionPolicy and a gradient divide factor.
FSDP2_WRAPPERS = ("fully_shard", "replicate")


class Problem(NamedTuple):
    key: str  # a key of the setup table, e.g. "tp"
    message: str  # one line: what is wrong; allowed: ...


@dataclass(frozen=True)
class ParallelDims:
    dp_api: str
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int

    @classmethod
    def of(cls, s) -> ParallelDims:
        """From a Setup (or anything with the same fields)."""
        return cls(s.dp_api, s.dp_replicate, s.dp_shard, s.tp, s.pp)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_dims(self) -> tuple[str, ...]:
        """The mesh dims that fully_shard / replicate span, outermost first; () when neither applies.

        fully_shard always has a dp_shard dim (FSDP over one rank is still FSDP, and an (n, 1) mesh
        is HSDP, not replicate). replicate always has a dp_replicate dim, of size 1 too: without it
        a TP or PP setup would run with no data-parallel wrapper and silently drop its
        MixedPrecisionPolicy and gradient_divide_factor, and a world-size-1 setup would have no mesh.
        """
        if self.dp_api == "fully_shard":
            return ("dp_replicate", "dp_shard") if self.dp_replicate > 1 else ("dp_shard",)
        if self.dp_api == "replicate":
            return ("dp_replicate",)
        return ()

    @property
    def mesh(self) -> dict[str, int]:
        """The mesh dims that exist, {name: size} outermost first: every dim of size > 1, plus the DP dims."""
        sizes = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}
        return {k: sizes[k] for k in MESH_ORDER if sizes[k] > 1 or k in self.dp_dims}

    @property
    def wraps(self) -> bool:
        """Whether the model is wrapped or split at all (TP, PP or an FSDP2 wrapper; DDP is wrapped separately)."""
        return bool(self.dp_dims) or self.tp > 1 or self.pp > 1

    @property
    def seed_before_wrap(self) -> bool:
        """DDP and a bare single model take the seed as a plain state dict, before wrapping; others through DCP after."""
        return self.dp_api == "ddp" or (self.dp_api == "none" and not self.wraps)


def problems(s, given: frozenset[str] | set[str] = frozenset()) -> list[Problem]:
    """Every rule a setup breaks, as (key, one line), in the order of RULES. `s` is a Setup; `given` the keys
    its table set explicitly (some defaults are indistinguishable from an explicit value that would be ignored)."""
    d = ParallelDims.of(s)
    return [Problem(key, message) for rule in RULES for key, message in rule(s, d, given)]


def _mesh_rules(s, d: ParallelDims, given):
    """The world size, and which dims each dp_api can use."""
    if d.world_size > MAX_WORLD_SIZE:
        yield "dp_replicate", f"world size dp_replicate*dp_shard*tp*pp = {d.world_size}; allowed: at most {MAX_WORLD_SIZE}"
    if s.dp_api == "replicate" and s.dp_shard > 1:
        yield "dp_shard", f"{s.dp_shard} with dp_api = \"replicate\"; allowed: 1 (replicate does not shard)"
    if s.dp_api == "ddp" and (s.dp_shard > 1 or s.tp > 1 or s.pp > 1):
        yield "dp_api", ("\"ddp\" takes only dp_replicate; allowed with dp_shard = tp = pp = 1 "
                         "(PP x DDP fails in torch; use replicate or fully_shard)")
    if s.dp_api == "none" and d.dp_degree > 1:
        yield "dp_api", f"\"none\" with a data-parallel degree of {d.dp_degree}; allowed: dp_replicate = dp_shard = 1"


def _wrapper_rules(s, d: ParallelDims, given):
    """Settings only an FSDP2 wrapper (or a pipeline) honours: anywhere else they would be dropped without a word."""
    mixed = [k for k in ("param_dtype", "reduce_dtype") if getattr(s, k) not in (None, s.train.dtype)]
    if mixed and s.dp_api not in FSDP2_WRAPPERS:
        yield mixed[0], (f"{getattr(s, mixed[0])!r} with dp_api = \"{s.dp_api}\" would be ignored (mixed precision is a "
                         "MixedPrecisionPolicy); allowed only with dp_api fully_shard or replicate")
    if s.gradient_divide_factor is not None and s.dp_api not in FSDP2_WRAPPERS:
        yield "gradient_divide_factor", (f"with dp_api = \"{s.dp_api}\" would be ignored; allowed only with dp_api "
                                         "fully_shard or replicate")
    elif s.gradient_divide_factor not in (None, 1.0) and s.dp_shard == 1:
        # FSDP2 with a 1-rank reduce-scatter group (replicate always; fully_shard with dp_shard = 1) divides by the
        # factor twice on the force-sum path that gloo needs (torch 2.13: once when copying, once after the
        # all-reduce), so the gradients come out divided by factor**2. 1.0 (no division) is unaffected.
        yield "gradient_divide_factor", (f"{s.gradient_divide_factor!r} with dp_shard = 1 is applied twice by torch's "
                                         "force-sum reduction; allowed: 1.0, or fully_shard with dp_shard > 1")
    if "pp_schedule" in given and s.pp == 1:
        yield "pp_schedule", f"\"{s.pp_schedule}\" with pp = 1 would be ignored; allowed: only with pp > 1"


def _fault_rules(s, d: ParallelDims, given):
    """Faults that need peers (or a data-parallel rank other than 0) to mean anything."""
    if s.fault in ("hang", "crash") and d.world_size < 2:
        yield "fault", f"\"{s.fault}\" is planted on rank 1; allowed only with world size >= 2"
    if s.fault == "local_clip" and (s.pp < 2 or s.train.max_norm == 0):
        yield "fault", ("\"local_clip\" clips each pipeline stage by its own norm; allowed only with pp >= 2 "
                        "and max_norm > 0")
    if s.fault == "replicated_data" and d.dp_degree < 2:
        yield "fault", ("\"replicated_data\" makes every data-parallel rank read rank 0's rows, a no-op at "
                        "data-parallel degree 1; allowed only with dp_replicate*dp_shard >= 2")


def _model_size_rules(s, d: ParallelDims, given):
    """Sizes of the model that TP and PP must divide."""
    cfg, t = s.train.model_config, s.train
    for what, n in (("n_heads", cfg.n_heads), ("ffn_hidden", cfg.ffn_hidden), ("vocab_size", cfg.vocab_size),
                    ("seq_len", t.seq_len)):
        if n % s.tp:
            yield "tp", f"{s.tp} does not divide {what} {n} of model {t.model!r}; allowed: a divisor of {n}"
            break
    stages = s.pp * s.stages_per_rank
    if stages > cfg.n_layers:
        yield "pp", (f"{stages} pipeline stages exceed the {cfg.n_layers} layers of model {t.model!r}; "
                     f"allowed: at most {cfg.n_layers} stages")


def _batch_rules(s, d: ParallelDims, given):
    """Sizes of the batch that data parallelism and the pipeline's microbatches must divide."""
    t = s.train
    if t.global_batch % d.dp_degree:
        yield "dp_replicate", (f"data-parallel degree {d.dp_degree} does not divide global_batch {t.global_batch}; "
                               "allowed: dp_replicate*dp_shard dividing global_batch")
    else:
        local = t.global_batch // d.dp_degree
        if local % s.microbatches:
            yield "microbatches", f"{s.microbatches} does not divide the local batch {local}; allowed: a divisor of {local}"
    if s.pp > 1 and s.pp_schedule != "gpipe" and s.microbatches < s.pp:
        yield "microbatches", (f"{s.microbatches} < pp {s.pp}; {s.pp_schedule} needs at least one microbatch per "
                               f"stage; allowed: >= {s.pp}")
    if s.pp_schedule == "interleaved_1f1b" and s.pp > 1:
        rounds = max(1, s.microbatches // s.pp)
        if s.microbatches % rounds:
            yield "microbatches", f"{s.microbatches} is not a multiple of the {rounds} rounds interleaved_1f1b needs"


# Checked in this order; the validator reports the first problem.
RULES = (_mesh_rules, _wrapper_rules, _fault_rules, _model_size_rules, _batch_rules)
