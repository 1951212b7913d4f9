"""Which code a run tested and which parity tested it: the commit and versions every run.json records.

The code under test is the user's: the git repository the run was started from (the current directory's
top level), which holds the case files, the baselines and the training code they exercise. parity is
usually an installed package inside it, so parity's own version is recorded apart from it, with parity's
own commit where parity runs from a checkout of itself. A baseline's `git_commit` comes from its run, so
it too names the code under test.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

NOT_A_REPOSITORY = "not a git repository"
# parity's own checkout, where parity runs from one (an installed parity has no .git two folders up).
PARITY_CHECKOUT = Path(__file__).resolve().parents[2]
# What parity's own runs write into its checkout: rewriting them must not mark parity dirty.
PARITY_OUTPUTS = ("baselines", "reports")


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    # LC_ALL=C: "not a git repository" is read from git's message, which a translated git would reword.
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "LC_ALL": "C"})


def _why(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    return f"unknown (git: {lines[-1] if lines else f'exit {done.returncode}'})"


def repository_root(start: Path) -> Path | None:
    """The top level of the git repository `start` lies in: the nearest folder up from it holding `.git` (a folder
    in a clone, a file in a worktree), stopping at GIT_CEILING_DIRECTORIES as git does; None outside one. Read
    from the file system, as git finds it, so that naming paths starts no process before the input is checked."""
    ceilings = {Path(c).resolve() for c in os.environ.get("GIT_CEILING_DIRECTORIES", "").split(os.pathsep) if c}
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if folder in ceilings and folder != here:
            return None
        if (folder / ".git").exists():
            return folder
    return None


def project_root(start: Path) -> Path:
    """The folder the run's paths are said relative to: `start`'s repository root, else `start` itself."""
    return repository_root(start) or Path(start).resolve()


def commit(root: Path, outputs=()) -> str:
    """HEAD of the repository whose top level is `root`, with "-dirty" where a tracked file differs from it.

    `outputs` (folders, absolute or relative to `root`) are what runs write: a run directory or a baselines
    folder that lies in the repository is left out, so storing a baseline does not make the next run dirty.
    Untracked files are left out too: a scratch file is not code under test until it is added.
    """
    try:
        head = _git(root, "rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return "no commit yet" if _git(root, "rev-parse", "--git-dir").returncode == 0 else _why(head)
        excluded = [f":(exclude,literal){rel}" for rel in (_inside(Path(root) / o, root) for o in outputs) if rel]
        status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown (git: {e})"
    if status.returncode != 0:
        return _why(status)
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _inside(path: Path, root: Path) -> str | None:
    """`path` relative to `root` (posix), where it lies strictly inside it; else None."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path.relative_to(root).as_posix() if path != root and path.is_relative_to(root) else None


def code_commit(start: Path, outputs=()) -> str:
    """The commit of the code under test: the repository `start` lies in (repository_root, the one rule that the
    recorded paths are relative to as well; see commit), or NOT_A_REPOSITORY."""
    root = repository_root(start)
    return NOT_A_REPOSITORY if root is None else commit(root, outputs)


def parity_version() -> str:
    """The installed `parity` distribution's version."""
    try:
        return importlib.metadata.version("parity")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parity_commit() -> str | None:
    """parity's own commit where it runs from a checkout of itself; None for an installed parity (asked, git
    would answer with the repository whose virtual environment holds it)."""
    if not (PARITY_CHECKOUT / ".git").exists():  # a file in a git worktree, a folder in a clone
        return None
    return commit(PARITY_CHECKOUT, PARITY_OUTPUTS)


def run_origin(start: Path, outputs=()) -> dict:
    """What a run records about the code it tested and the parity that tested it, started from `start`."""
    return {"git_commit": code_commit(start, outputs), "parity_version": parity_version(),
            "parity_commit": parity_commit()}
