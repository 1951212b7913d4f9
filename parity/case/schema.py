"""The case schema: what a case holds, its defaults, the kinds of value each key takes, and its constants.

A case is `cases/NAME.toml`, read by parity.case.loader. Nothing here imports torch: the rank side
builds its setups from these dataclasses, and the comparison and report code read cases cheaply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from parity.case.fields import Choice, Flag, Integer, NpyFile, Number, Or, declared, kinds_of
from parity.case.trainer import BUILTIN
from parity.core.errors import InputError
from parity.core.determinism import DETERMINISM
from parity.core.parallel_dims import MAX_WORLD_SIZE, ParallelDims
from parity.core.presets import PRESETS, ModelConfig
from parity.core.records import PROBE_PHASES

DP_APIS = ("fully_shard", "replicate", "ddp", "none")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
DTYPES = ("float32", "bfloat16", "float64")
ATTENTION = ("math", "flash", "efficient", "cudnn")  # which runs where: parity.case.attention
MODES = ("bitwise", "tolerance", "statistical")
OUTCOMES = ("match", "diverge")
METRICS = ("loss", "grad_norm", "weights")
# What [expect.tolerance] bounds: the metrics, and the probes of each phase (parity.verdict.localize).
TOLERANCE_KEYS = METRICS + PROBE_PHASES
# Planted faults: the negative controls prove the harness catches these, and `hang`/`crash`
# prove that a stuck or failing rank is reported and cleaned up.
# `noise` nudges the reference's gradients at step 2 in its repeat run only: a stand-in for a
# nondeterministic kernel, which the repeat check must catch. `local_clip` makes each pipeline
# stage clip with its own norm instead of the global one: only an engaged clip can reveal it.
# `negate_shard` and `transpose_shard` corrupt rank 0's local shard of one parameter after the
# last step (negated, or its transpose written back row-major: a permutation of the shard): the
# norms stay the same (up to the rounding of their sums), so only the weight sketches catch
# them, on that parameter.
FAULTS = ("replicated_data", "skip_seed_load", "hang", "crash", "noise", "local_clip", "negate_shard", "transpose_shard")
# Faults that say where, written as a table: scale one module's output in every forward, or one
# parameter's gradient before the norm and clip, by `factor`, every step. What they name is
# checked against parity.core.presets (the names probes record), so the probes must point at it.
FAULT_TABLES = {"scale_output": "module", "scale_grad": "param"}  # kind -> the key naming where
ALL_PARAMS = "*"  # scale_grad's param that names every parameter
REPEAT_SUFFIX = ".repeat"  # the reference's second run in the same launch: `<reference>.repeat`
MEMBER_SUFFIX = ".member"  # statistical mode's ensemble: `<reference>.member01` ... (no case-file name has a dot)
# What an ensemble member changes (parity.verdict.ensemble): "weights" multiplies each seed-checkpoint weight by
# (1 + eps z), a few ULPs, as a reduction-order change would; "data" draws other batches (the setup seed).
PERTURBATIONS = ("weights", "data")
DATA_MEMBER_SEED = 1000  # a data member i draws with the reference's seed + DATA_MEMBER_SEED + i

# Default tolerances by the lowest precision any setup computes in. fp32 numbers: observed across
# DDP/FSDP/HSDP/TP/PP at 8 CPU ranks (loss rel <= 2e-7, grad norm rel <= 8.5e-6) with ~10x
# headroom; bf16 from mixed-precision runs (loss rel 2.4e-4, grad norm 7.7e-3).
# `weights` bounds the per-parameter L2 norms of the final weights and their sketches (whose
# fp32 differences after 10 debugmodel steps at 8 CPU ranks, lr 5e-3, reach 1.2e-5 of the norm
# between layouts and 2.7e-5 against the float64 oracle; the norms' stay below 7e-7).
# forward/backward/update bound the probes of that phase (sums of squares of module outputs,
# gradients and weight updates). fp32: the largest relative differences over 10 debugmodel steps
# at 8 CPU ranks, across every committed tolerance case, are 4.4e-6, 1.6e-5 and 5.6e-6 (one
# process against FSDP 8); ~10x headroom. bf16 (no tolerance case measures it yet) as its metrics.
DEFAULT_TOLERANCES = {
    "float64": {"loss": (1e-12, 0.0), "grad_norm": (1e-10, 0.0), "weights": (1e-10, 0.0),
                "forward": (1e-10, 0.0), "backward": (1e-10, 0.0), "update": (1e-10, 0.0)},
    "float32": {"loss": (1e-5, 0.0), "grad_norm": (1e-4, 0.0), "weights": (1e-4, 0.0),
                "forward": (5e-5, 0.0), "backward": (2e-4, 0.0), "update": (1e-4, 0.0)},
    "bfloat16": {"loss": (1e-2, 0.0), "grad_norm": (5e-2, 0.0), "weights": (2e-2, 0.0),
                 "forward": (5e-2, 0.0), "backward": (5e-2, 0.0), "update": (5e-2, 0.0)},
}


# Upper bounds: far above any parity case on real GPU clusters, far below what would exhaust a
# machine before the first step (steps = 10**12 would never finish). A case beyond them is almost
# surely a typo. MAX_WORLD_SIZE lives with the parallelism rules.
MAX_STEPS = 1_000_000
MAX_SEQ_LEN = 131_072
MAX_GLOBAL_BATCH = 65_536
MAX_MICROBATCHES = 4096
MAX_SEED = 2**63 - 1


class SpecError(InputError):
    """One line: `FILE: KEY: what is wrong; allowed: ...`."""


class BackendError(SpecError):
    """A valid case that the chosen device cannot run (an SDPA backend without a kernel there)."""


@dataclass(frozen=True)
class Train:
    model: str = declared("debugmodel", Choice(tuple(PRESETS)))
    steps: int = declared(10, Integer(1, MAX_STEPS))
    seed: int = declared(42, Integer(0, MAX_SEED))
    global_batch: int = declared(16, Integer(1, MAX_GLOBAL_BATCH))
    seq_len: int = declared(128, Integer(2, MAX_SEQ_LEN))
    # lr and max_norm are chosen so that a 10-step debugmodel case exercises what it claims to test:
    # the loss falls below ln(vocab) by step 6, and the pre-clip grad norm passes max_norm from
    # step 6 on, so a wrong norm used for clipping changes the weights.
    lr: float = declared(5e-3, Number(positive=True))
    warmup_steps: int = declared(2, Integer(0, MAX_STEPS))
    max_norm: float = declared(0.4, Number())  # 0 disables clipping; the pre-clip norm is recorded either way
    weight_decay: float = declared(0.1, Number())
    dtype: str = declared("float32", Choice(DTYPES))
    # SDPA backend pinned for the setup (a setup may override it; see parity.case.attention)
    attention: str = declared("math", Choice(ATTENTION))
    data: str | None = declared(None, NpyFile())  # path to a .npy of token ids; None = the built-in generator

    @property
    def model_config(self) -> ModelConfig:
        return PRESETS[self.model]


@dataclass(frozen=True)
class Setup:
    name: str
    train: Train
    dp_api: str = declared("fully_shard", Choice(DP_APIS))
    dp_replicate: int = declared(1, Integer(1, MAX_WORLD_SIZE))
    dp_shard: int = declared(1, Or(-1, Integer(1, MAX_WORLD_SIZE)))  # -1: filled from world_size
    tp: int = declared(1, Integer(1, MAX_WORLD_SIZE))
    pp: int = declared(1, Integer(1, MAX_WORLD_SIZE))
    pp_schedule: str = declared("1f1b", Choice(PP_SCHEDULES))
    microbatches: int = declared(1, Integer(1, MAX_MICROBATCHES))
    param_dtype: str | None = declared(None, Choice(DTYPES))  # None: train.dtype (no mixed precision)
    reduce_dtype: str | None = declared(None, Choice(DTYPES))
    gradient_divide_factor: float | None = declared(None, Number(positive=True))
    fault: str | None = None  # a FAULTS name, or a FAULT_TABLES kind with fault_at and fault_factor
    fault_at: str | None = None  # the module (scale_output) or parameter (scale_grad) a table fault scales
    fault_factor: float | None = None
    repeat: bool = False  # set by the runner on the reference's second run, never by a case file
    perturb: int | None = None  # a weights-ensemble member's number (seeds its perturbation); never from a case file
    trainer: str = BUILTIN
    # Another trainer's setup: its own keys, validated and normalised (parity.case.trainer.SetupRules), its
    # world_size, and the run.json fields that name the trainer's build (record_fields).
    external: dict | None = None

    @property
    def dims(self) -> ParallelDims:
        """Mesh dims and where each wrapper applies: the rules shared with parity.rank.parallelize."""
        return ParallelDims.of(self)

    @property
    def world_size(self) -> int:
        return self.external["world_size"] if self.external else self.dims.world_size

    @property
    def dp_degree(self) -> int:
        return self.dims.dp_degree

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pp > 1 and self.pp_schedule == "interleaved_1f1b" else 1

    @property
    def compute_dtype(self) -> str:
        return self.param_dtype or self.train.dtype

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def bound(self, scale: float) -> float:
        """The largest difference allowed against a reference of this size."""
        return self.atol + self.rtol * abs(scale)

    def allows(self, a: float, b: float) -> bool:
        return abs(a - b) <= self.bound(b)


@dataclass(frozen=True)
class Statistical:
    """`[expect.statistical]`: the ensemble of reference runs and the test against it (parity.verdict.ensemble).
    Defaults and their reasons: benchmarks/ensemble_study.md."""

    members: int = declared(8, Integer(4, 256))
    perturb: str = declared("weights", Choice(PERTURBATIONS))
    window: int = declared(25, Integer(1))  # steps per window (its median is what is tested); at most the case's steps
    alpha: float = declared(0.01, Number(positive=True))  # false-alarm rate of one setup's test, over its windows and metrics


@dataclass(frozen=True)
class Expect:
    mode: str = declared("bitwise", Choice(MODES))
    outcome: str = declared("match", Choice(OUTCOMES))
    tolerance: dict[str, Tolerance] = field(default_factory=dict)
    tolerance_source: dict[str, str] = field(default_factory=dict)  # "case" or "default for <dtype>"
    first_divergence: dict | None = None  # negative controls: {"metric": ..., "step": ...} they must be caught at
    localized: dict | None = None  # negative controls: {"step", "phase", "name"} their probes must first part at
    repeat: bool | None = declared(None, Flag())  # run the reference twice and compare bitwise; None: on for CUDA, off for CPU
    statistical: Statistical | None = None  # mode "statistical" only


PROBE_ALL_UP_TO = 64  # a case of at most this many steps probes every step by default
PROBE_FIRST = 8  # otherwise steps 1..PROBE_FIRST, about PROBE_ALL_UP_TO evenly spaced ones, and the last


@dataclass(frozen=True)
class Probes:
    """`[probes]`: which steps record logical probes (probes.csv). Turning them off, or leaving a step out,
    changes nothing else a run records."""

    enabled: bool = declared(True, Flag())
    steps: tuple[int, ...] | str | None = None  # explicit step numbers, "all", or None: the default rule

    def steps_for(self, n_steps: int) -> list[int]:
        """The probed steps of an n-step run (a --steps override may shorten the case: later steps drop out)."""
        if not self.enabled:
            return []
        if self.steps == "all" or (self.steps is None and n_steps <= PROBE_ALL_UP_TO):
            return list(range(1, n_steps + 1))
        if self.steps is not None:
            return [s for s in self.steps if s <= n_steps]
        every = math.ceil(n_steps / PROBE_ALL_UP_TO)
        return sorted({*range(1, PROBE_FIRST + 1), *range(every, n_steps + 1, every), n_steps})


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    description: str
    setups: tuple[Setup, ...]
    expect: Expect
    sha256: str
    seed_checkpoint: Path | None = None
    determinism: dict = field(default_factory=lambda: dict(DETERMINISM))  # parity.core.determinism.DETERMINISM + relaxations
    probes: Probes = Probes()

    @property
    def reference(self) -> Setup:
        return self.setups[0]

    @property
    def world_size(self) -> int:
        return max(s.world_size for s in self.setups)

    def setup(self, name: str) -> Setup:
        return next(s for s in self.setups if s.name == name)

    def probe_steps(self, setup: Setup) -> tuple[int, ...]:
        """The steps a run of `setup` records probes at; none for an ensemble member, which only widens the
        band. The one rule for the runner's jobs and the planner's shares."""
        if MEMBER_SUFFIX in setup.name:
            return ()
        return tuple(self.probes.steps_for(setup.train.steps))

    @property
    def ensemble(self) -> tuple[Setup, ...]:
        """Statistical mode's members: the reference again, each perturbed its own way; () in other modes."""
        st = self.expect.statistical
        if st is None:
            return ()
        ref = self.reference
        return tuple(replace(ref, name=f"{ref.name}{MEMBER_SUFFIX}{i:02d}",
                             **({"perturb": i} if st.perturb == "weights" else
                                {"train": replace(ref.train, seed=(ref.train.seed + DATA_MEMBER_SEED + i) % (MAX_SEED + 1))}))
                     for i in range(1, st.members + 1))


TRAIN_KEYS = set(kinds_of(Train))
# What a comparison holds fixed: a setup that trained another model, on other data, for another
# number of steps or on other batch shapes would differ for a reason no verdict names. A setup may
# still change the seed and the optimizer keys (negative controls do).
SHARED_TRAIN_KEYS = ("model", "steps", "seq_len", "global_batch", "data")
SETUP_KEYS = set(kinds_of(Setup)) | {"fault", "world_size"}  # a built-in setup's keys beside [train]'s
TOP_KEYS = {"description", "seed_checkpoint", "train", "setups", "expect", "determinism", "probes"}


def default_tolerances(setups) -> tuple[str, dict[str, Tolerance]]:
    """Tolerances for the lowest precision that any setup computes in."""
    order = ("bfloat16", "float32", "float64")
    dtypes = {s.compute_dtype for s in setups} | {s.reduce_dtype for s in setups if s.reduce_dtype}
    dtype = next(d for d in order if d in dtypes)
    return dtype, {m: Tolerance(*DEFAULT_TOLERANCES[dtype][m]) for m in TOLERANCE_KEYS}
