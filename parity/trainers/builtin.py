"""Parity's own trainer, host side: its setups train inside parity's ranks (parity.rank), from a seed
checkpoint of parity's model (parity.trainers.seed) or the case's own."""

from __future__ import annotations

from pathlib import Path

from parity.case.trainer import BUILTIN
from parity.trainers.base import Trainer
from parity.trainers.seed import resolve_seed


class BuiltinTrainer(Trainer):
    """Setups without a `trainer` key: the case schema holds their keys and checks."""

    name = BUILTIN
    own_ranks = True

    def seed_checkpoint(self, case, device: str, cache: Path | None, timeout_s: float):
        """The case's own seed_checkpoint, hashed, or the cached build of the model every setup trains."""
        keys = {(s.train.model, s.train.seed, s.train.dtype) for s in case.setups}
        if len(keys) != 1:  # a setup overriding seed or dtype still starts from the reference's weights
            keys = {(case.reference.train.model, case.reference.train.seed, case.reference.train.dtype)}
        model, seed, dtype = keys.pop()
        return resolve_seed(model, seed, dtype, cache, external=case.seed_checkpoint)


TRAINER = BuiltinTrainer()
