"""Reading `[train]` and each `[setups.NAME]`: parity's own setups by the schema's declared kinds, another
trainer's through its SetupRules, then what each trainer checks across the case's setups."""

from __future__ import annotations

from dataclasses import replace

from parity.case import rules
from parity.case.fields import Choice, Integer, Number
from parity.case.reader import Reader
from parity.case.schema import (ALL_PARAMS, FAULT_TABLES, FAULTS, SETUP_KEYS, SHARED_TRAIN_KEYS, TRAIN_KEYS, Setup,
                                Train)
from parity.case.trainer import BUILTIN, SetupRules
from parity.core.parallel_dims import MAX_WORLD_SIZE
from parity.core.presets import ModelConfig, param_names, probe_modules

WORLD_SIZE = Integer(1, MAX_WORLD_SIZE)
FAULT_SHAPE = ("a table { kind = \"scale_output\", module = M, factor = F } or "
               "{ kind = \"scale_grad\", param = P, factor = F }")


def read_train(r: Reader, table: dict, prefix: str, base: Train) -> Train:
    r.keys(table, TRAIN_KEYS, prefix + ".")
    return replace(base, **r.declared(table, Train, prefix + "."))


def read_setup(r: Reader, name: str, body: dict, train: Train) -> Setup:
    prefix = f"setups.{name}"
    trainer = r.check(f"{prefix}.trainer", body.get("trainer", BUILTIN), Choice(tuple(r.trainers))) \
        if isinstance(body, dict) else BUILTIN
    if trainer != BUILTIN:
        return read_external_setup(r, name, body, train, r.trainers[trainer])
    owners = {key: t.name for t in r.trainers.values() for key in t.keys}
    if isinstance(body, dict) and (theirs := [k for k in body if k in owners]):
        owner = owners[theirs[0]]
        r.fail(f"{prefix}.{theirs[0]}", f"belongs to trainer = \"{owner}\" setups; this setup is built-in "
               f"(no trainer key); allowed: trainer = \"{owner}\" and its keys, or the built-in keys")
    r.keys(body, SETUP_KEYS | TRAIN_KEYS, prefix + ".")
    for key in SHARED_TRAIN_KEYS:
        if key in body:
            r.fail(f"{prefix}.{key}", f"a setup may not override {key}; allowed: set it in [train] for every setup")
    setup_train = read_train(r, {k: v for k, v in body.items() if k in TRAIN_KEYS}, prefix, train)
    values = {}
    for key, value in body.items():  # in the file's order, so the first mistake is the one reported
        if key == "fault":
            values.update(read_fault(r, f"{prefix}.{key}", value, setup_train.model_config))
        elif key not in TRAIN_KEYS and key != "world_size":
            values.update(r.declared({key: value}, Setup, prefix + "."))
    s = fill_dp_shard(r, Setup(name=name, train=setup_train, **values), body.get("world_size"), prefix)
    r.fail_first((problem for rule in rules.SETUP_RULES for problem in rule(s, body)), prefix + ".")
    return s


def fill_dp_shard(r: Reader, s: Setup, world, prefix: str) -> Setup:
    """dp_shard = -1 is what world_size leaves once dp_replicate, tp and pp are taken."""
    if s.dp_shard != -1:
        return s
    if world is None:
        r.fail(f"{prefix}.dp_shard", "-1 (fill from world size) needs world_size in the same setup")
    rest = s.dp_replicate * s.tp * s.pp
    if r.check(f"{prefix}.world_size", world, WORLD_SIZE) % rest:
        r.fail(f"{prefix}.world_size", f"{world} is not divisible by dp_replicate*tp*pp = {rest}")
    return replace(s, dp_shard=world // rest)


def read_fault(r: Reader, key: str, value, cfg: ModelConfig) -> dict:
    """A fault name, or a table { kind, module | param, factor }: the Setup fields it sets."""
    if not isinstance(value, dict):
        if value in FAULT_TABLES:
            r.fail(key, f"{value!r} says where and how much; allowed: {FAULT_SHAPE}")
        return {"fault": r.check(key, value, Choice(FAULTS))}
    kind = r.check(f"{key}.kind", value.get("kind"), Choice(tuple(FAULT_TABLES)))
    where = FAULT_TABLES[kind]
    r.keys(value, {"kind", where, "factor"}, key + ".")
    names = probe_modules(cfg) if where == "module" else param_names(cfg)
    at = value.get(where)
    # "*" scales every gradient: a loss-normalisation error (gradients summed over tokens, the
    # recorded loss still their mean), which AdamW's scale invariance and clipping mostly hide.
    if at not in names and not (where == "param" and at == ALL_PARAMS):
        few = ", ".join([*names[:4], "...", *names[-2:]])
        r.fail(f"{key}.{where}", f"{at!r} is not a {where} of the model; allowed: {few}"
               + (f", or {ALL_PARAMS!r} for every parameter" if where == "param" else ""))
    if "factor" not in value:
        r.fail(f"{key}.factor", "required; allowed: a finite number > 0")
    return {"fault": kind, "fault_at": at, "fault_factor": r.check(f"{key}.factor", value["factor"], Number(True))}


def read_external_setup(r: Reader, name: str, body: dict, train: Train, trainer: SetupRules) -> Setup:
    """A setup run by another training stack: its own keys (its SetupRules), world_size, train overrides."""
    prefix = f"setups.{name}"
    allowed = trainer.keys | trainer.train_keys | {"trainer", "world_size"}
    for key in body:
        if key not in allowed:
            r.fail(f"{prefix}.{key}", foreign_key_problem(key, trainer, allowed))
    if "world_size" not in body:
        r.fail(f"{prefix}.world_size", f"required for a trainer = \"{trainer.name}\" setup (how many ranks its "
               "command starts); allowed: an integer from 1 to " + str(MAX_WORLD_SIZE))
    world = r.check(f"{prefix}.world_size", body["world_size"], WORLD_SIZE)
    setup_train = read_train(r, {k: v for k, v in body.items() if k in TRAIN_KEYS}, prefix, train)
    own = {k: v for k, v in body.items() if k in trainer.keys}
    r.fail_first(trainer.setup_problems(own, r.case_dir), prefix + ".")
    external = {**trainer.normalize(own, r.case_dir), "world_size": world}
    if trainer.record_fields:
        external["record_fields"] = trainer.record_fields
    return Setup(name=name, train=setup_train, trainer=trainer.name, external=external)


def foreign_key_problem(key: str, trainer: SetupRules, allowed: set[str]) -> str:
    """Why a key is not one of another trainer's setup keys, and what is allowed there."""
    if key in TRAIN_KEYS and trainer.train_keys_from is not None:
        return (f"a built-in trainer key; a {trainer.name} setup takes it from {trainer.train_keys_from}; "
                f"allowed here: {', '.join(sorted(allowed))}")
    if key in SHARED_TRAIN_KEYS:
        return f"a setup may not override {key}; allowed: set it in [train] for every setup"
    return f"not a key of a trainer = \"{trainer.name}\" setup; allowed: {', '.join(sorted(allowed))}"


def across_trainers(r: Reader, setups: tuple[Setup, ...], train_given: set[str]) -> tuple[Setup, ...]:
    """Each trainer's case-level checks (the first problem fails), then what its setups take from the case."""
    for trainer in r.trainers.values():
        r.fail_first(trainer.case_problems(setups, train_given))
    for trainer in r.trainers.values():
        setups = trainer.finish(setups, train_given)
    return setups
