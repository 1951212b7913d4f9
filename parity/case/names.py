"""A case on the command line: a path, or a case name looked up in the project's cases folder. One rule,
used by every subcommand that takes a case.

- An argument that is an existing path means that path (a case file, or a folder of them), even
  where it is also a valid case name.
- Otherwise a bare name (`replicate_vs_hsdp`, or `replicate_vs_hsdp.toml`: no folder part) means
  `<cases folder>/<name>.toml`.
- A miss is one InputError line naming the argument and what was not found, with "did you mean: a, b?"
  where close names exist (difflib), else which folder was searched.

Where only a case's name is needed (the case's folder in a run directory), `case_name_arg` takes a
name or a case file's path and gives the name.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from parity.core.errors import InputError
from parity.core.paths import name_problem

SUFFIX = ".toml"
CLOSE_CUTOFF, CLOSE_COUNT = 0.6, 3  # difflib's default cutoff; three names fit on the error line


class CaseNotFound(InputError):
    """A case argument that is neither a path nor a case in the cases folder: one line, exit 2."""


def resolve_case_arg(arg: str, cases_dir: str | Path) -> Path:
    """The case file or folder `arg` means: the path itself where it exists, else `<cases_dir>/<name>.toml` for
    a bare name; raises CaseNotFound, with the closest names, where neither exists."""
    path = Path(arg)
    if _present(path):
        return path
    name = bare_name(arg)
    if name is None or path == Path(cases_dir):  # a path that is not there: suggest from the folder it names
        close = close_names(path.stem, case_names(path.parent))
        shown = [str(path.parent / f"{c}{SUFFIX}") for c in close]
        raise CaseNotFound(f"{arg}: no such case file or folder" + (did_you_mean(shown) or _allowed(cases_dir)))
    candidate = Path(cases_dir) / f"{name}{SUFFIX}"
    if _present(candidate):
        return candidate
    names = case_names(cases_dir)
    lead = f"{arg}: no such case: not a path, and no {candidate}"
    if close := did_you_mean(close_names(name, names)):
        raise CaseNotFound(lead + close)
    searched = (f"searched {cases_dir} ({len(names)} case file(s), none close)" if Path(cases_dir).is_dir()
                else f"the cases folder {cases_dir} does not exist")
    raise CaseNotFound(f"{lead}; {searched}")


def case_name_arg(arg: str, what: str) -> str:
    """The case name `arg` gives where a run directory is searched: a case file's path (`…/NAME.toml`) gives NAME,
    whether or not the file is here; anything else must itself be a valid name. `what` names the argument."""
    name = Path(arg).stem if arg.endswith(SUFFIX) else arg
    if (problem := name_problem(name)) is not None:
        raise InputError(f"{what}: {problem}; or a case file's path (its name without .toml is the case name)")
    return name


def bare_name(arg: str) -> str | None:
    """The case name an argument with no folder part spells (`NAME` or `NAME.toml`), or None."""
    if "/" in arg or os.sep in arg:
        return None
    name = arg[: -len(SUFFIX)] if arg.endswith(SUFFIX) else arg
    return name if name_problem(name) is None else None


def names_a_case(word: str, cases_dir: str | Path) -> bool:
    """Whether a bare name names a case file in the cases folder (so it is a case, not a flag's value)."""
    name = bare_name(word)
    return name is not None and (Path(cases_dir) / f"{name}{SUFFIX}").is_file()


def case_names(folder: str | Path) -> list[str]:
    """The case names (file names without .toml) in a folder, sorted; none where it is not a folder."""
    folder = Path(folder)
    try:
        return sorted(p.stem for p in folder.glob(f"*{SUFFIX}") if name_problem(p.stem) is None)
    except OSError:  # an unreadable folder only means no suggestions; the miss is reported anyway
        return []


def close_names(word: str, names) -> list[str]:
    """The names closest to `word`, best first (difflib's ratio), at most CLOSE_COUNT."""
    return difflib.get_close_matches(word, list(names), n=CLOSE_COUNT, cutoff=CLOSE_CUTOFF)


def did_you_mean(close: list[str]) -> str:
    """"; did you mean: a, b?" for a message, or "" where nothing is close."""
    return f"; did you mean: {', '.join(close)}?" if close else ""


def _allowed(cases_dir) -> str:
    where = cases_dir if Path(cases_dir).is_dir() else f"the cases folder {cases_dir} (which does not exist)"
    return f"; allowed: a case file, a folder of them, or the name of a case file in {where}"


def _present(path: Path) -> bool:
    # Anything stat can see counts as there, a dangling link or an unreadable file included: the loader
    # then says why it cannot be read, rather than this module calling it missing.
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True
