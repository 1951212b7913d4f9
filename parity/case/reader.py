"""Reading one case file's tables: every mistake is one SpecError line, `FILE: KEY: what is allowed`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from parity.case.fields import Problem, kinds_of
from parity.case.schema import SpecError
from parity.case.trainer import SetupRules


class Reader:
    """The file being read, the trainers its setups may name, and the checks that fail with its name."""

    def __init__(self, where: str, trainers: Mapping[str, SetupRules]):
        self.where, self.trainers = where, trainers
        self.case_dir = Path(where).parent

    def fail(self, key: str, message: str):
        raise SpecError(f"{self.where}: {key}: {message}")

    def fail_first(self, problems, prefix: str = "") -> None:
        """Fail with the first of (key, message) problems, the key under `prefix`; nothing if there are none."""
        for key, message in problems:
            self.fail(prefix + key, message)

    def keys(self, table: dict, allowed: set[str], prefix: str):
        if not isinstance(table, dict):
            self.fail(prefix.rstrip(".") or "<top>", f"must be a table, got {table!r}")
        for key in table:
            if key not in allowed:
                self.fail(prefix + key, f"unknown key; allowed: {', '.join(sorted(allowed))}")

    def check(self, key: str, value, kind):
        """The value as the schema keeps it, if `kind` allows it."""
        try:
            return kind.check(value, self.case_dir)
        except Problem as e:
            self.fail(key, str(e))

    def declared(self, table: dict, cls, prefix: str, **bounds) -> dict:
        """The values of `table` that name fields of the schema dataclass `cls`, each checked by its declared kind
        (or by the kind in `bounds`, where the case sets the range), in the file's order."""
        kinds = {**kinds_of(cls), **bounds}
        return {key: self.check(prefix + key, value, kinds[key]) for key, value in table.items() if key in kinds}
