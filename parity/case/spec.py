"""Case files: the schema, its defaults, and validation that names the file and the key.

A case is `cases/NAME.toml`. Nothing here imports torch: a bad case is rejected before any
process starts, and the comparison and report code can read cases cheaply.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from parity.core import files
from parity.core.errors import InputError
from parity.case.trainer import BUILTIN, PARITY_ONLY, SetupRules
from parity.core.fingerprint import DETERMINISM, NCCL_CHOICES
from parity.core.parallel_dims import MAX_WORLD_SIZE, ParallelDims, problems
from parity.core.paths import duplicates_ignoring_case, name_problem
from parity.core.presets import PRESETS, ModelConfig, param_names, probe_modules
from parity.core.records import PROBE_PHASES
from parity.core.tokens import TokenFileError, load_token_file

DP_APIS = ("fully_shard", "replicate", "ddp", "none")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
DTYPES = ("float32", "bfloat16", "float64")
ATTENTION = ("math", "flash", "efficient", "cudnn")
# Which SDPA backend has a kernel for which compute dtype, per device. CPU, as the torch 2.13 CPU
# build runs them (tests/test_gpu_trust.py tries each one): math and flash in every dtype, no
# efficient or cuDNN kernel. CUDA: flash and cuDNN need 16-bit inputs; efficient has no float64.
ATTENTION_DTYPES = {
    "cpu": {"math": DTYPES, "flash": DTYPES},
    "cuda": {"math": DTYPES, "flash": ("bfloat16",), "efficient": ("float32", "bfloat16"), "cudnn": ("bfloat16",)},
}
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
    model: str = "debugmodel"
    steps: int = 10
    seed: int = 42
    global_batch: int = 16
    seq_len: int = 128
    # lr and max_norm are chosen so that a 10-step debugmodel case exercises what it claims to test:
    # the loss falls below ln(vocab) by step 6, and the pre-clip grad norm passes max_norm from
    # step 6 on, so a wrong norm used for clipping changes the weights.
    lr: float = 5e-3
    warmup_steps: int = 2
    max_norm: float = 0.4  # 0 disables clipping; the pre-clip norm is recorded either way
    weight_decay: float = 0.1
    dtype: str = "float32"
    attention: str = "math"  # SDPA backend pinned for the setup (a setup may override it; see ATTENTION_DTYPES)
    data: str | None = None  # path to a .npy of token ids; None = the built-in generator

    @property
    def model_config(self) -> ModelConfig:
        return PRESETS[self.model]


@dataclass(frozen=True)
class Setup:
    name: str
    train: Train
    dp_api: str = "fully_shard"
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int = 1
    param_dtype: str | None = None  # None: train.dtype (no mixed precision)
    reduce_dtype: str | None = None
    gradient_divide_factor: float | None = None
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

    members: int = 8
    perturb: str = "weights"
    window: int = 25  # steps per window (its median is what is tested)
    alpha: float = 0.01  # false-alarm rate of one setup's test, split over its windows and metrics


@dataclass(frozen=True)
class Expect:
    mode: str = "bitwise"
    outcome: str = "match"
    tolerance: dict[str, Tolerance] = field(default_factory=dict)
    tolerance_source: dict[str, str] = field(default_factory=dict)  # "case" or "default for <dtype>"
    first_divergence: dict | None = None  # negative controls: {"metric": ..., "step": ...} they must be caught at
    localized: dict | None = None  # negative controls: {"step", "phase", "name"} their probes must first part at
    repeat: bool | None = None  # run the reference twice and compare bitwise; None: on for CUDA, off for CPU
    statistical: Statistical | None = None  # mode "statistical" only


PROBE_ALL_UP_TO = 64  # a case of at most this many steps probes every step by default
PROBE_FIRST = 8  # otherwise steps 1..PROBE_FIRST, about PROBE_ALL_UP_TO evenly spaced ones, and the last


@dataclass(frozen=True)
class Probes:
    """`[probes]`: which steps record logical probes (probes.csv). Turning them off, or leaving a step out,
    changes nothing else a run records."""

    enabled: bool = True
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
    determinism: dict = field(default_factory=lambda: dict(DETERMINISM))  # parity.core.fingerprint.DETERMINISM + relaxations
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


TRAIN_KEYS = {f.name for f in fields(Train)}
# What a comparison holds fixed: a setup that trained another model, on other data, for another
# number of steps or on other batch shapes would differ for a reason no verdict names. A setup may
# still change the seed and the optimizer keys (negative controls do).
SHARED_TRAIN_KEYS = ("model", "steps", "seq_len", "global_batch", "data")
SETUP_KEYS = ({f.name for f in fields(Setup)} - {"name", "train", "repeat", "perturb", "trainer", "external",
                                                  "fault_at", "fault_factor"} | {"world_size"})
TOP_KEYS = {"description", "seed_checkpoint", "train", "setups", "expect", "determinism", "probes"}


def load_case(path: str | Path, trainers: Mapping[str, SetupRules] = PARITY_ONLY) -> Case:
    """One case file, validated; `trainers`: the rules of each trainer a setup may name (parity.trainers)."""
    path = Path(path)
    where = str(path)
    try:
        raw = files.read_bytes(path)
    except OSError as e:
        raise SpecError(f"{where}: cannot read: {e.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}: not valid TOML: {e}") from None
    v = _Validator(where, trainers)
    if (problem := name_problem(path.stem)) is not None:
        v.fail("case name", f"{problem} (the case name is the file name without .toml)")
    v.keys(doc, TOP_KEYS, "")
    description = doc.get("description")
    if not isinstance(description, str) or not description.strip():
        v.fail("description", "required: a sentence on why these setups should agree, and how closely")
    train = v.train(doc.get("train", {}), "train", Train())
    setups_doc = doc.get("setups")
    if not isinstance(setups_doc, dict) or len(setups_doc) < 2:
        v.fail("setups", "need two or more [setups.NAME] tables; the first is the reference")
    for name in setups_doc:
        if (problem := name_problem(name)) is not None:
            v.fail(f"setups.{name!r}", problem)  # no dots: so no name can end in REPEAT_SUFFIX either
    if clashes := duplicates_ignoring_case(setups_doc):
        v.fail("setups", f"names must differ in more than letter case: {', '.join(clashes)}")
    setups = tuple(v.setup(name, body, train) for name, body in setups_doc.items())
    setups = v.across_trainers(setups, set(doc.get("train", {}) if isinstance(doc.get("train", {}), dict) else ()))
    for s in setups[1:]:
        if s.fault == "noise":
            v.fail(f"setups.{s.name}.fault", "\"noise\" perturbs the reference's repeat run; allowed only on the "
                   "reference (first) setup")
    if train.data is not None:  # setups cannot override data, model or seq_len: one check covers them all
        v.data(setups[0], "train.data")
    expect = v.expect(doc.get("expect", {}), setups)
    determinism = v.determinism(doc.get("determinism", {}))
    probes = v.probes(doc.get("probes", {}), train.steps)
    if expect.localized and expect.localized["step"] not in probes.steps_for(train.steps):
        v.fail("expect.localized.step", f"{expect.localized['step']} is not a probed step, so no probe can part there; "
               "allowed: a step [probes] records (probes enabled, and the step in its steps)")
    seed = doc.get("seed_checkpoint")
    seed_path = None
    if seed is not None:
        if not isinstance(seed, str):
            v.fail("seed_checkpoint", f"must be a path string, got {seed!r}")
        seed_path = (path.parent / seed).resolve()
        if not (seed_path / ".metadata").is_file():
            v.fail("seed_checkpoint", f"{seed_path} is not a torch.distributed.checkpoint directory (no .metadata)")
    return Case(
        name=path.stem,
        path=path,
        description=description.strip(),
        setups=setups,
        expect=expect,
        sha256=hashlib.sha256(raw).hexdigest(),
        seed_checkpoint=seed_path,
        determinism=determinism,
        probes=probes,
    )


def attention_problem(case: Case, setup: Setup, device: str) -> str | None:
    """Why the setup's SDPA backend cannot run on the device (None if it can)."""
    if setup.trainer != BUILTIN:
        return None  # another training stack chooses its own kernels
    kernels = ATTENTION_DTYPES[device]
    backend, dtype = setup.train.attention, setup.compute_dtype
    if backend not in kernels:
        return f"{backend!r} has no {device} kernel; allowed on {device}: {', '.join(kernels)}"
    if dtype not in kernels[backend]:
        fits = [b for b, dtypes in kernels.items() if dtype in dtypes]
        return (f"{backend!r} cannot run in {dtype} on {device} (it needs {' or '.join(kernels[backend])}); "
                f"allowed in {dtype}: {', '.join(fits)}")
    if device == "cuda" and backend == "cudnn" and case.determinism["deterministic_algorithms"]:
        return ("'cudnn' has no deterministic backward, so strict determinism disables it; allowed: math, flash, "
                "efficient, or relax it with [determinism] deterministic_algorithms = false")
    return None


def check_attention(case: Case, device: str) -> None:
    """Reject up front, naming the file and key, a backend the device or dtype has no kernel for."""
    for s in case.setups:
        problem = attention_problem(case, s, device)
        if problem:
            raise BackendError(f"{case.path}: setups.{s.name}.attention: {problem}")


def default_tolerances(setups) -> tuple[str, dict[str, Tolerance]]:
    """Tolerances for the lowest precision that any setup computes in."""
    order = ("bfloat16", "float32", "float64")
    dtypes = {s.compute_dtype for s in setups} | {s.reduce_dtype for s in setups if s.reduce_dtype}
    dtype = next(d for d in order if d in dtypes)
    return dtype, {m: Tolerance(*DEFAULT_TOLERANCES[dtype][m]) for m in TOLERANCE_KEYS}


class _Validator:
    def __init__(self, where: str, trainers: Mapping[str, SetupRules]):
        self.where, self.trainers = where, trainers

    def fail(self, key: str, message: str):
        raise SpecError(f"{self.where}: {key}: {message}")

    def keys(self, table: dict, allowed: set[str], prefix: str):
        if not isinstance(table, dict):
            self.fail(prefix.rstrip(".") or "<top>", f"must be a table, got {table!r}")
        for key in table:
            if key not in allowed:
                self.fail(prefix + key, f"unknown key; allowed: {', '.join(sorted(allowed))}")

    def choice(self, key: str, value, allowed):
        if value not in allowed:
            self.fail(key, f"{value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return value

    def integer(self, key: str, value, minimum: int, maximum: int | None = None):
        if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
                or (maximum is not None and value > maximum)):
            allowed = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
            self.fail(key, f"{value!r} is not allowed; allowed: {allowed}")
        return value

    def number(self, key: str, value, positive: bool = False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (positive and value == 0):
            self.fail(key, f"{value!r} is not allowed; allowed: a finite number {'> 0' if positive else '>= 0'}")
        return float(value)

    def train(self, table: dict, prefix: str, base: Train) -> Train:
        self.keys(table, TRAIN_KEYS, prefix + ".")
        values = {}
        for key, value in table.items():
            k = f"{prefix}.{key}"
            if key == "model":
                values[key] = self.choice(k, value, tuple(PRESETS))
            elif key in ("dtype",):
                values[key] = self.choice(k, value, DTYPES)
            elif key == "attention":
                values[key] = self.choice(k, value, ATTENTION)
            elif key == "steps":
                values[key] = self.integer(k, value, 1, MAX_STEPS)
            elif key == "global_batch":
                values[key] = self.integer(k, value, 1, MAX_GLOBAL_BATCH)
            elif key == "seq_len":
                values[key] = self.integer(k, value, 2, MAX_SEQ_LEN)
            elif key == "seed":
                values[key] = self.integer(k, value, 0, MAX_SEED)
            elif key == "warmup_steps":
                values[key] = self.integer(k, value, 0, MAX_STEPS)
            elif key == "lr":
                values[key] = self.number(k, value, positive=True)
            elif key in ("max_norm", "weight_decay"):
                values[key] = self.number(k, value)
            elif key == "data":
                p = Path(self.where).parent / str(value)
                if not isinstance(value, str) or not value.endswith(".npy") or not p.is_file():
                    self.fail(k, f"{value!r} is not allowed; allowed: an existing .npy file of token ids")
                values[key] = str(p.resolve())
        return replace(base, **values)

    def setup(self, name: str, body: dict, train: Train) -> Setup:
        prefix = f"setups.{name}"
        trainer = self.choice(f"{prefix}.trainer", body.get("trainer", BUILTIN), tuple(self.trainers)) \
            if isinstance(body, dict) else BUILTIN
        if trainer != BUILTIN:
            return self.external_setup(name, body, train, self.trainers[trainer])
        owners = {key: rules.name for rules in self.trainers.values() for key in rules.keys}
        if isinstance(body, dict) and (theirs := [k for k in body if k in owners]):
            owner = owners[theirs[0]]
            self.fail(f"{prefix}.{theirs[0]}", f"belongs to trainer = \"{owner}\" setups; this setup is built-in "
                      f"(no trainer key); allowed: trainer = \"{owner}\" and its keys, or the built-in keys")
        self.keys(body, SETUP_KEYS | TRAIN_KEYS, prefix + ".")
        for key in SHARED_TRAIN_KEYS:
            if key in body:
                self.fail(f"{prefix}.{key}", f"a setup may not override {key}; allowed: set it in [train] for every setup")
        overrides = {k: v for k, v in body.items() if k in TRAIN_KEYS}
        setup_train = self.train(overrides, prefix, train)
        values = {}
        for key, value in body.items():
            k = f"{prefix}.{key}"
            if key in TRAIN_KEYS or key == "world_size":
                continue
            if key == "dp_api":
                values[key] = self.choice(k, value, DP_APIS)
            elif key == "dp_shard" and value == -1:
                values[key] = -1  # filled from world_size below, as torchtitan does
            elif key in ("dp_replicate", "dp_shard", "tp", "pp"):
                values[key] = self.integer(k, value, 1, MAX_WORLD_SIZE)
            elif key == "microbatches":
                values[key] = self.integer(k, value, 1, MAX_MICROBATCHES)
            elif key == "pp_schedule":
                values[key] = self.choice(k, value, PP_SCHEDULES)
            elif key in ("param_dtype", "reduce_dtype"):
                values[key] = self.choice(k, value, DTYPES)
            elif key == "gradient_divide_factor":
                values[key] = self.number(k, value, positive=True)
            elif key == "fault":
                values.update(self.fault(k, value, setup_train.model_config))
        s = Setup(name=name, train=setup_train, **values)
        world = body.get("world_size")
        if s.dp_shard == -1:
            if world is None:
                self.fail(f"{prefix}.dp_shard", "-1 (fill from world size) needs world_size in the same setup")
            rest = s.dp_replicate * s.tp * s.pp
            if self.integer(f"{prefix}.world_size", world, 1, MAX_WORLD_SIZE) % rest:
                self.fail(f"{prefix}.world_size", f"{world} is not divisible by dp_replicate*tp*pp = {rest}")
            s = replace(s, dp_shard=world // rest)
        if world is not None and self.integer(f"{prefix}.world_size", world, 1, MAX_WORLD_SIZE) != s.world_size:
            self.fail(
                f"{prefix}.world_size",
                f"{world} does not factor as dp_replicate*dp_shard*tp*pp = "
                f"{s.dp_replicate}*{s.dp_shard}*{s.tp}*{s.pp} = {s.world_size}",
            )
        self.consistent(s, prefix, frozenset(body))
        return s

    def fault(self, key: str, value, cfg: ModelConfig) -> dict:
        """A fault name, or a table { kind, module | param, factor }: the Setup fields it sets."""
        shape = ("a table { kind = \"scale_output\", module = M, factor = F } or "
                 "{ kind = \"scale_grad\", param = P, factor = F }")
        if not isinstance(value, dict):
            if value in FAULT_TABLES:
                self.fail(key, f"{value!r} says where and how much; allowed: {shape}")
            return {"fault": self.choice(key, value, FAULTS)}
        kind = self.choice(f"{key}.kind", value.get("kind"), tuple(FAULT_TABLES))
        where = FAULT_TABLES[kind]
        self.keys(value, {"kind", where, "factor"}, key + ".")
        names = probe_modules(cfg) if where == "module" else param_names(cfg)
        at = value.get(where)
        # "*" scales every gradient: a loss-normalisation error (gradients summed over tokens, the
        # recorded loss still their mean), which AdamW's scale invariance and clipping mostly hide.
        if at not in names and not (where == "param" and at == ALL_PARAMS):
            few = ", ".join([*names[:4], "...", *names[-2:]])
            self.fail(f"{key}.{where}", f"{at!r} is not a {where} of the model; allowed: {few}"
                      + (f", or {ALL_PARAMS!r} for every parameter" if where == "param" else ""))
        if "factor" not in value:
            self.fail(f"{key}.factor", "required; allowed: a finite number > 0")
        return {"fault": kind, "fault_at": at, "fault_factor": self.number(f"{key}.factor", value["factor"], positive=True)}

    def probes(self, table: dict, steps: int) -> Probes:
        self.keys(table, {"enabled", "steps"}, "probes.")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            self.fail("probes.enabled", f"{enabled!r} is not allowed; allowed: true, false")
        chosen = table.get("steps")
        allowed = f"\"all\", or a list of distinct step numbers from 1 to {steps} (the case's steps)"
        if chosen is None or chosen == "all":
            return Probes(enabled, chosen)
        if not isinstance(chosen, list) or not chosen:
            self.fail("probes.steps", f"{chosen!r} is not allowed; allowed: {allowed} (enabled = false records none)")
        for i, step in enumerate(chosen):
            self.integer(f"probes.steps[{i}]", step, 1, steps)
        if len(set(chosen)) != len(chosen):
            self.fail("probes.steps", f"{chosen!r} names a step twice; allowed: {allowed}")
        return Probes(enabled, tuple(sorted(chosen)))

    def external_setup(self, name: str, body: dict, train: Train, rules: SetupRules) -> Setup:
        """A setup run by another training stack: its own keys (rules), world_size, train overrides."""
        prefix, trainer = f"setups.{name}", rules.name
        allowed = rules.keys | rules.train_keys | {"trainer", "world_size"}
        for key in body:
            if key in allowed:
                continue
            if key in TRAIN_KEYS and rules.train_keys_from is not None:
                self.fail(f"{prefix}.{key}", f"a built-in trainer key; a {trainer} setup takes it from "
                          f"{rules.train_keys_from}; allowed here: {', '.join(sorted(allowed))}")
            if key in SHARED_TRAIN_KEYS:
                self.fail(f"{prefix}.{key}", f"a setup may not override {key}; allowed: set it in [train] for every setup")
            self.fail(f"{prefix}.{key}", f"not a key of a trainer = \"{trainer}\" setup; allowed: {', '.join(sorted(allowed))}")
        if "world_size" not in body:
            self.fail(f"{prefix}.world_size", f"required for a trainer = \"{trainer}\" setup (how many ranks its "
                      "command starts); allowed: an integer from 1 to " + str(MAX_WORLD_SIZE))
        world = self.integer(f"{prefix}.world_size", body["world_size"], 1, MAX_WORLD_SIZE)
        setup_train = self.train({k: v for k, v in body.items() if k in TRAIN_KEYS}, prefix, train)
        own = {k: v for k, v in body.items() if k in rules.keys}
        for key, message in rules.setup_problems(own, Path(self.where).parent):
            self.fail(f"{prefix}.{key}", message)
        external = {**rules.normalize(own, Path(self.where).parent), "world_size": world}
        if rules.record_fields:
            external["record_fields"] = rules.record_fields
        return Setup(name=name, train=setup_train, trainer=trainer, external=external)

    def across_trainers(self, setups, train_given: set[str]) -> tuple[Setup, ...]:
        """Each trainer's case-level checks (the first problem fails), then what its setups take from the case."""
        for rules in self.trainers.values():
            for key, message in rules.case_problems(setups, train_given):
                self.fail(key, message)
        for rules in self.trainers.values():
            setups = rules.finish(setups, train_given)
        return setups

    def consistent(self, s: Setup, prefix: str, given=frozenset()):
        """The parallelism rules live in parity.core.parallel_dims, shared with the mesh builder: report the first."""
        for key, message in problems(s, given):
            self.fail(f"{prefix}.{key}", message)

    def data(self, s: Setup, key: str):
        """A token file is read and checked here, before any rank starts, against the setup's model."""
        try:
            load_token_file(s.train.data, s.train.seq_len, s.train.model_config.vocab_size)
        except TokenFileError as e:
            self.fail(key, str(e))

    def expect(self, table: dict, setups) -> Expect:
        self.keys(table, {"mode", "outcome", "tolerance", "first_divergence", "localized", "repeat", "statistical"},
                  "expect.")
        repeat = table.get("repeat")
        if repeat is not None and not isinstance(repeat, bool):
            self.fail("expect.repeat", f"{repeat!r} is not allowed; allowed: true, false")
        mode = self.choice("expect.mode", table.get("mode", "bitwise"), MODES)
        outcome = self.choice("expect.outcome", table.get("outcome", "match"), OUTCOMES)
        statistical = self.statistical(table.get("statistical"), mode, setups)
        dtype, tolerance = default_tolerances(setups)
        source = {m: f"default for {dtype}" for m in TOLERANCE_KEYS}
        tol_doc = table.get("tolerance", {})
        self.keys(tol_doc, set(TOLERANCE_KEYS), "expect.tolerance.")
        for metric, bounds in tol_doc.items():
            key = f"expect.tolerance.{metric}"
            self.keys(bounds, {"rtol", "atol"}, key + ".")
            base = tolerance[metric]
            tolerance[metric] = Tolerance(
                rtol=self.number(f"{key}.rtol", bounds.get("rtol", base.rtol)),
                atol=self.number(f"{key}.atol", bounds.get("atol", base.atol)),
            )
            source[metric] = "case"
        first = table.get("first_divergence")
        if first is not None:
            key = "expect.first_divergence"
            if outcome != "diverge":
                self.fail(key, "only for outcome = \"diverge\" (a negative control)")
            shape = ("a table { metric = \"loss\" | \"grad_norm\", step = N, and the effect: ratio = R "
                     "(other / reference at that step, within = 0.01 by default) or min_rel = X }")
            if not isinstance(first, dict):
                self.fail(key, f"must be {shape}")
            self.keys(first, {"metric", "step", "ratio", "within", "min_rel"}, key + ".")
            steps = min(s.train.steps for s in setups)
            parsed = {"metric": self.choice(f"{key}.metric", first.get("metric"), ("loss", "grad_norm")),
                      "step": self.integer(f"{key}.step", first.get("step"), 1, steps)}
            if statistical and parsed["step"] % statistical.window and parsed["step"] != steps:
                w = statistical.window
                self.fail(f"{key}.step", f"{parsed['step']} ends no window: statistical mode judges means over "
                          f"windows of {w} steps; allowed: a multiple of {w}, or the last step {steps}")
            # A control must be caught by the planted effect, not by a last-bit difference: it states the size.
            if ("ratio" in first) == ("min_rel" in first):
                self.fail(key, f"state the expected effect with exactly one of ratio, min_rel; allowed: {shape}")
            if "ratio" in first:
                parsed["ratio"] = self.number(f"{key}.ratio", first["ratio"], positive=True)
                parsed["within"] = self.number(f"{key}.within", first.get("within", 0.01), positive=True)
            else:
                if "within" in first:
                    self.fail(f"{key}.within", "goes with ratio; allowed: ratio = R, within = W")
                parsed["min_rel"] = self.number(f"{key}.min_rel", first["min_rel"], positive=True)
            first = parsed
        localized = self.localized(table.get("localized"), outcome, setups)
        if localized and statistical:
            self.fail("expect.localized", "probes part at the first rounding difference, which statistical mode "
                      "expects; allowed: first_divergence (the window the control leaves the band in)")
        return Expect(mode=mode, outcome=outcome, tolerance=tolerance, tolerance_source=source, first_divergence=first,
                      localized=localized, repeat=repeat, statistical=statistical)

    def statistical(self, table, mode: str, setups) -> Statistical | None:
        """`[expect.statistical]`, with its defaults, for mode "statistical" (and only there)."""
        key = "expect.statistical"
        if mode != "statistical":
            if table is not None:
                self.fail(key, f"only for mode = \"statistical\" (this case's mode is {mode!r})")
            return None
        table = {} if table is None else table
        self.keys(table, {f.name for f in fields(Statistical)}, key + ".")
        ref, base = setups[0], Statistical()
        if ref.trainer != BUILTIN:
            self.fail(f"setups.{ref.name}.trainer", "statistical mode runs the reference again as an ensemble, "
                      "perturbing it from inside the built-in trainer; allowed: a built-in reference (the first setup)")
        steps = min(s.train.steps for s in setups)
        st = Statistical(
            members=self.integer(f"{key}.members", table.get("members", base.members), 4, 256),
            perturb=self.choice(f"{key}.perturb", table.get("perturb", base.perturb), PERTURBATIONS),
            window=self.integer(f"{key}.window", table.get("window", base.window), 1, steps),
            alpha=self.number(f"{key}.alpha", table.get("alpha", base.alpha), positive=True))
        if st.alpha >= 1:
            self.fail(f"{key}.alpha", f"{table['alpha']!r} is not allowed; allowed: a number between 0 and 1")
        if st.perturb == "data" and ref.train.data is not None:
            self.fail(f"{key}.perturb", "\"data\" draws other batches with another seed, but a token file "
                      "(train.data) is read in order whatever the seed; allowed: \"weights\"")
        return st

    def localized(self, table, outcome: str, setups) -> dict | None:
        """Where a negative control's probes must first part: {step, phase, name} (see parity.verdict.localize)."""
        if table is None:
            return None
        key = "expect.localized"
        if outcome != "diverge":
            self.fail(key, "only for outcome = \"diverge\" (a negative control)")
        if other := next((s for s in setups if s.trainer != BUILTIN), None):
            self.fail(key, f"needs probes, which only built-in setups record; setup {other.name} is trainer = "
                      f"\"{other.trainer}\"")
        steps = min(s.train.steps for s in setups)
        shape = "a table { step = N, phase = \"forward\" | \"backward\" | \"update\", name = \"layers.3.feed_forward\" }"
        if not isinstance(table, dict):
            self.fail(key, f"must be {shape}")
        self.keys(table, {"step", "phase", "name"}, key + ".")
        step = self.integer(f"{key}.step", table.get("step"), 1, steps)
        phase = self.choice(f"{key}.phase", table.get("phase"), PROBE_PHASES)
        name = table.get("name")
        cfg = setups[0].train.model_config
        names = probe_modules(cfg) if phase == "forward" else param_names(cfg)
        if name not in names:
            what = "a probed module" if phase == "forward" else "a parameter"
            self.fail(f"{key}.name", f"{name!r} is not {what} of model {setups[0].train.model} in phase {phase}; "
                      f"allowed: {', '.join(names[:4])}, ... ({len(names)} in all)")
        return {"step": step, "phase": phase, "name": name}

    def determinism(self, table: dict) -> dict:
        """The defaults of parity.core.fingerprint.DETERMINISM, with what the case relaxes by naming it."""
        self.keys(table, set(DETERMINISM), "determinism.")
        settings = dict(DETERMINISM)
        for key, value in table.items():
            k = f"determinism.{key}"
            if key in NCCL_CHOICES:
                settings[key] = self.choice(k, value, NCCL_CHOICES[key])
            elif isinstance(DETERMINISM[key], bool):
                if not isinstance(value, bool):
                    self.fail(k, f"{value!r} is not allowed; allowed: true, false")
                settings[key] = value
            else:
                settings[key] = self.integer(k, value, 0, 64)  # NCCL has at most 64 channels
        return settings


def find_cases(directory: str | Path = "cases") -> list[Path]:
    return sorted(Path(directory).glob("*.toml"))


def load_cases(paths, trainers: Mapping[str, SetupRules] = PARITY_ONLY) -> list[Case]:
    """Case files and directories of them, validated (load_case), with names unique ignoring letter case."""
    cases = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_cases(p)
            if not found:
                raise SpecError(f"{p}: no case files (*.toml) in this directory")
            cases.extend(load_case(c, trainers) for c in found)
        else:
            cases.append(load_case(p, trainers))
    if clashes := duplicates_ignoring_case([c.name for c in cases]):
        raise SpecError(f"case names must be unique in one run, ignoring letter case: {', '.join(clashes)}")
    return cases
