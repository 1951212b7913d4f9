"""The pytest commands parity prints for a person to run (reproduce a case, create its baselines).

They must work from the user's repository, where parity is an installed package and there is no
parity/test_parity.py to name: pytest reaches the items with `--pyargs`, which imports the
installed package, and finds the user's cases through their configuration (parity.config).
"""

from __future__ import annotations

import shlex

# The documented way to run every case from any repository (docs/own-repository.md, examples/github-actions-8gpu.yml).
PYTEST = ("pytest", "--pyargs", "parity")


def pytest_case(name: str, *options: str) -> list[str]:
    """The command that runs exactly case `name`: its node id (-k would also match cases whose
    names contain it). `name` is a checked case name (parity.core.paths.NAME_PATTERN)."""
    return ["pytest", "--pyargs", f"parity.test_parity::test_case[{name}]", *options]


def shell(command: list[str]) -> str:
    """`command` as one line to paste into a shell (the node id's brackets are quoted)."""
    return shlex.join(command)
