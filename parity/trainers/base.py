"""The trainer protocol: what the loader, the runner and the pytest plugin ask of a trainer.

A trainer is the case loader's SetupRules (its setup keys, their checks and normal form, its
case-level checks) plus its host side: what it needs installed, the seed checkpoint its setups
load, and how one of its setups runs. parity.trainers holds the registry of them.
"""

from __future__ import annotations

from pathlib import Path

from parity.case.trainer import SetupRules


class Trainer(SetupRules):
    """A trainer, with the defaults of one that needs nothing installed. Subclasses set `name` and override."""

    marker: str | None = None  # the pytest marker of cases with its setups, described; None: no marker
    # True: its setups train inside parity's ranks (parity.rank), many trainings in one torchrun launch.
    # False: each setup is one launch of its own, through prepare() and run_setup().
    own_ranks: bool = False
    # True: it trains its own model, from a seed checkpoint it builds (seed_checkpoint) where the case names none.
    own_model: bool = False

    def missing(self, case) -> str | None:
        """Why this machine cannot run the case's setups of this trainer (None if it can): said before anything runs."""
        return None

    def seed_checkpoint(self, case, device: str, cache: Path | None, timeout_s: float):
        """The seed checkpoint every setup of the case loads (parity.trainers.seed_cache.SeedInfo), checked now.
        Raises parity.trainers.seed_cache.SeedBuildError where the trainer cannot build it."""
        raise NotImplementedError(f"trainer {self.name} builds no seed checkpoint")

    def prepare(self, case, setup, device: str, cache: Path | None, timeout_s: float, workdir: Path,
                seed_checkpoint: str) -> tuple[dict, str, dict]:
        """(command, seed checkpoint path, run.json fields) for one setup of a case being run (own_ranks False)."""
        raise NotImplementedError(f"trainer {self.name} runs in parity's ranks")

    def run_setup(self, command: dict, setup, case_name: str, out: Path, device: str, seed_checkpoint: str,
                  provenance: dict, timeout_s: float, gpus: list[str] | None = None, extra_info: dict | None = None):
        """Run one prepared setup and write its records; returns how it ended (parity.core.process.LaunchResult)."""
        raise NotImplementedError(f"trainer {self.name} runs in parity's ranks")
