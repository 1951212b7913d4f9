"""The pytest commands parity prints for a person to run (reproduce a case, create its baselines).

They must work from the user's repository, where parity is an installed package and there is no
parity/test_parity.py to name: pytest reaches the items with `--pyargs`, which imports the
installed package, and finds the user's cases through their configuration (parity.config).

A recorded command names its paths relative to the repository root (parity.core.provenance.project_root), so
it reads the same on every machine and runs from that root; a path outside the repository stays absolute.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

# The documented way to run every case from any repository (docs/own-repository.md, examples/github-actions-8gpu.yml).
PYTEST = ("pytest", "--pyargs", "parity")


def pytest_case(name: str, *options: str) -> list[str]:
    """The command that runs exactly case `name`: its node id (-k would also match cases whose
    names contain it). `name` is a checked case name (parity.core.paths.NAME_PATTERN)."""
    return ["pytest", "--pyargs", f"parity.test_parity::test_case[{name}]", *options]


def shell(command: list[str]) -> str:
    """`command` as one line to paste into a shell (the node id's brackets are quoted)."""
    return shlex.join(command)


# The options that say where a run writes: where a reproduction writes is its reader's choice.
OUT_OPTIONS = ("--out", "--parity-out")


def root_relative(path, root: Path) -> str:
    """`path` (relative paths are the current directory's) relative to `root` where it lies inside it, in
    posix form; otherwise absolute."""
    absolute = Path(os.path.abspath(path))
    resolved, base = absolute.resolve(), Path(root).resolve()
    if resolved.is_relative_to(base):
        return resolved.relative_to(base).as_posix()
    return str(absolute)


def shareable(argv: list[str], root: Path) -> list[str]:
    """A recorded command as a pull request shows it, to run from the repository root: each absolute path that
    lies inside `root` made relative to it (a record written before commands were recorded so), and an --out
    that lies outside it left out, so the reproduction writes to its default run directory. The reader's
    machine has no such folder to keep, and the writer's home or temporary folder is no business of theirs."""
    shown, args = [], iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in OUT_OPTIONS:
            value = _relative(value if eq else next(args, ""), root)
            if not Path(value).is_absolute():
                shown += [f"{flag}={value}"] if eq else [flag, value]
        elif eq and flag.startswith("--"):
            shown.append(f"{flag}={_relative(value, root)}")
        else:
            shown.append(_relative(arg, root))
    return shown


def _relative(arg: str, root: Path) -> str:
    # Only absolute paths are rewritten: a relative one was recorded relative to the root already, and a word
    # that is no path (a case name, a device) is left as it is.
    return root_relative(arg, root) if Path(arg).is_absolute() else arg
