"""The trainers a setup can name, in one registry: parity's own (`builtin`), `command` and `torchtitan`.

Each is a parity.trainers.base.Trainer: its setup keys, their checks and normal form, its case-level
checks, what it needs installed, its seed checkpoint and how one of its setups runs. Adding a
trainer is one module with a Trainer and one line in TRAINERS. The case loader takes the registry
as a parameter (parity.case stays below this package); load_case and load_cases here pass it.
"""

from __future__ import annotations

from pathlib import Path

from parity.case import loader
from parity.case.schema import Case
from parity.case.trainer import BUILTIN
from parity.trainers import builtin, command, torchtitan
from parity.trainers.base import Trainer

# Order matters where the registry is listed: in the loader's "allowed:" and in which trainer's
# missing() speaks first.
TRAINERS: dict[str, Trainer] = {t.name: t for t in (builtin.TRAINER, torchtitan.TRAINER, command.TRAINER)}


def load_case(path: str | Path) -> Case:
    """A case file, validated with every registered trainer's rules (parity.case.loader.load_case)."""
    return loader.load_case(path, TRAINERS)


def load_cases(paths) -> list[Case]:
    """Case files and directories of them, validated with every registered trainer's rules."""
    return loader.load_cases(paths, TRAINERS)


def missing(case: Case) -> str | None:
    """Why this machine cannot run the case (a trainer it uses is not installed), or None."""
    return next(filter(None, (t.missing(case) for t in TRAINERS.values())), None)


def seed_trainer(case: Case) -> Trainer:
    """The trainer whose seed checkpoint every setup of the case loads: where the case names none, the first
    registered trainer of its setups that trains its own model; else parity's own (its model, or the case's file)."""
    used = {s.trainer for s in case.setups}
    if case.seed_checkpoint is None:
        for t in TRAINERS.values():
            if t.own_model and t.name in used:
                return t
    return TRAINERS[BUILTIN]
