"""What the case loader asks of a trainer: the keys of its setups, their checks and their normal form.

A setup names its trainer with `trainer = "NAME"`; a setup without one is parity's own (BUILTIN), whose
keys are the case schema's. The loader takes a mapping of trainer name -> SetupRules (parity.trainers
holds the registry of the installed ones); this module only declares what it reads. The defaults are
those of parity's own trainer: no keys of its own, nothing to check beyond the schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

BUILTIN = "builtin"  # parity's own trainer: the setups the case schema describes


class SetupRules:
    """A trainer as the case loader sees it. Subclasses set the attributes and override the checks."""

    name: str = BUILTIN
    keys: frozenset[str] = frozenset()  # its setups' own keys, beside `trainer` and `world_size`
    train_keys: frozenset[str] = frozenset()  # the [train] keys its setups may override
    # Where its setups take the other [train] keys from (a sentence), or None: those keys are not its setups' own.
    train_keys_from: str | None = None
    # The run.json fields that say which build of the trainer made a run; baselines copy them.
    record_fields: tuple[str, ...] = ()

    def setup_problems(self, body: dict, case_dir: Path) -> list[tuple[str, str]]:
        """(key, message) for each thing wrong with a setup's own keys (`body` holds only those)."""
        return []

    def normalize(self, body: dict, case_dir: Path) -> dict:
        """The validated own keys as the runner uses them: Setup.external, beside world_size."""
        return dict(body)

    def case_problems(self, setups: tuple, train_given: set[str]) -> list[tuple[str, str]]:
        """(full key, message) for what the case's setups together break; `train_given`: the keys [train] sets."""
        return []

    def finish(self, setups: tuple, train_given: set[str]) -> tuple:
        """The case's setups, with what this trainer's setups take from the whole case filled in."""
        return setups


PARITY_ONLY: Mapping[str, SetupRules] = {BUILTIN: SetupRules()}  # the loader's default: parity's own setups only
