"""Loading case files: TOML in, a validated Case out, or one SpecError line naming the file and the key.

The trainers a setup may name come in as a parameter (a mapping of name -> SetupRules); without it,
only parity's own setups load. parity.trainers.load_case passes every registered trainer.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from pathlib import Path

from parity.case import rules
from parity.case.expect import read_expect
from parity.case.fields import Choice, Flag, Integer
from parity.case.reader import Reader
from parity.case.schema import TOP_KEYS, Case, Probes, SpecError, Train
from parity.case.setups import across_trainers, read_setup, read_train
from parity.case.trainer import PARITY_ONLY, SetupRules
from parity.core import files
from parity.core.determinism import DETERMINISM, NCCL_CHOICES
from parity.core.paths import duplicates_ignoring_case, name_problem

# What [determinism] may relax: NCCL's choices, the flags, and channel counts (NCCL has at most 64).
DETERMINISM_KINDS = {key: Choice(NCCL_CHOICES[key]) if key in NCCL_CHOICES else
                     Flag() if isinstance(default, bool) else Integer(0, 64) for key, default in DETERMINISM.items()}


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
    return read_case(Reader(where, trainers), path, doc, hashlib.sha256(raw).hexdigest())


def read_case(r: Reader, path: Path, doc: dict, sha256: str) -> Case:
    if (problem := name_problem(path.stem)) is not None:
        r.fail("case name", f"{problem} (the case name is the file name without .toml)")
    r.keys(doc, TOP_KEYS, "")
    description = doc.get("description")
    if not isinstance(description, str) or not description.strip():
        r.fail("description", "required: a sentence on why these setups should agree, and how closely")
    train = read_train(r, doc.get("train", {}), "train", Train())
    setups = read_setups(r, doc.get("setups"), train)
    setups = across_trainers(r, setups, set(doc.get("train", {}) if isinstance(doc.get("train", {}), dict) else ()))
    r.fail_first(problem for rule in rules.SETUPS_RULES for problem in rule(setups, train))
    expect = read_expect(r, doc.get("expect", {}), setups)
    determinism = read_determinism(r, doc.get("determinism", {}))
    probes = read_probes(r, doc.get("probes", {}), train.steps)
    r.fail_first(problem for rule in rules.CASE_RULES for problem in rule(expect, probes, train))
    return Case(name=path.stem, path=path, description=description.strip(), setups=setups, expect=expect,
                sha256=sha256, seed_checkpoint=read_seed_checkpoint(r, doc.get("seed_checkpoint"), path),
                determinism=determinism, probes=probes)


def read_setups(r: Reader, table, train: Train) -> tuple:
    if not isinstance(table, dict) or len(table) < 2:
        r.fail("setups", "need two or more [setups.NAME] tables; the first is the reference")
    for name in table:
        if (problem := name_problem(name)) is not None:
            r.fail(f"setups.{name!r}", problem)  # no dots: so no name can end in REPEAT_SUFFIX either
    if clashes := duplicates_ignoring_case(table):
        r.fail("setups", f"names must differ in more than letter case: {', '.join(clashes)}")
    return tuple(read_setup(r, name, body, train) for name, body in table.items())


def read_probes(r: Reader, table: dict, steps: int) -> Probes:
    r.keys(table, {"enabled", "steps"}, "probes.")
    enabled = r.check("probes.enabled", table.get("enabled", True), Flag())
    chosen = table.get("steps")
    allowed = f"\"all\", or a list of distinct step numbers from 1 to {steps} (the case's steps)"
    if chosen is None or chosen == "all":
        return Probes(enabled, chosen)
    if not isinstance(chosen, list) or not chosen:
        r.fail("probes.steps", f"{chosen!r} is not allowed; allowed: {allowed} (enabled = false records none)")
    for i, step in enumerate(chosen):
        r.check(f"probes.steps[{i}]", step, Integer(1, steps))
    if len(set(chosen)) != len(chosen):
        r.fail("probes.steps", f"{chosen!r} names a step twice; allowed: {allowed}")
    return Probes(enabled, tuple(sorted(chosen)))


def read_determinism(r: Reader, table: dict) -> dict:
    """The defaults of parity.core.determinism.DETERMINISM, with what the case relaxes by naming it."""
    r.keys(table, set(DETERMINISM), "determinism.")
    return {**DETERMINISM, **{key: r.check(f"determinism.{key}", value, DETERMINISM_KINDS[key])
                              for key, value in table.items()}}


def read_seed_checkpoint(r: Reader, seed, path: Path) -> Path | None:
    """The case's own seed checkpoint: a torch.distributed.checkpoint directory, relative to the case file."""
    if seed is None:
        return None
    if not isinstance(seed, str):
        r.fail("seed_checkpoint", f"must be a path string, got {seed!r}")
    seed_path = (path.parent / seed).resolve()
    if not (seed_path / ".metadata").is_file():
        r.fail("seed_checkpoint", f"{seed_path} is not a torch.distributed.checkpoint directory (no .metadata)")
    return seed_path


def find_case_files(directory: str | Path = "cases") -> list[Path]:
    """The case files (*.toml) in a directory, sorted."""
    return sorted(Path(directory).glob("*.toml"))


def load_cases(paths, trainers: Mapping[str, SetupRules] = PARITY_ONLY) -> list[Case]:
    """Case files and directories of them, validated (load_case), with names unique ignoring letter case."""
    cases = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_case_files(p)
            if not found:
                raise SpecError(f"{p}: no case files (*.toml) in this directory")
            cases.extend(load_case(c, trainers) for c in found)
        else:
            cases.append(load_case(p, trainers))
    if clashes := duplicates_ignoring_case([c.name for c in cases]):
        raise SpecError(f"case names must be unique in one run, ignoring letter case: {', '.join(clashes)}")
    return cases
