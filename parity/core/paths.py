"""Names that become paths, and the one check that a path lies inside the folder it belongs to.

Case names (the case file's stem), setup names and platform keys all end up as folder or file
names under `--out` and `--baselines`. They come from input, so they are hostile until checked:
a case file named `..toml` once made a run delete the parent of `--out`. Every path the harness
writes or deletes is built with `inside()`, which refuses anything that would land elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from parity.core.errors import InputError

# No dots: a setup name is joined with the platform as `<setup>.<platform>.csv`, so a dot in a
# name would make the file name ambiguous (and `.`/`..` are the escapes this rule exists for).
# No leading '-': a name is also a command-line argument in the reproduce commands we print.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
NAME_RULE = "letters, digits, '_' and '-', not starting with '-', 1 to 64 characters"
# Platform keys are written by runs ("cpu", "cuda-h100-..."); a copied run directory is input too.
PLATFORM_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")

# The harness marks every case folder it creates; it deletes only folders that carry the mark.
CASE_MARKER = ".parity-case"


def name_problem(name) -> str | None:
    """Why `name` cannot be a case or setup name, or None if it can."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        return f"{name!r} is not a valid name; allowed: {NAME_RULE}"
    return None


def duplicates_ignoring_case(names) -> list[str]:
    """Names that collide on a case-insensitive filesystem (macOS, Windows shares)."""
    seen: dict[str, str] = {}
    clashes = []
    for n in names:
        if n.lower() in seen:
            clashes.append(f"{seen[n.lower()]!r} and {n!r}")
        seen.setdefault(n.lower(), n)
    return clashes


def check_platform(platform) -> str:
    if not isinstance(platform, str) or PLATFORM_PATTERN.fullmatch(platform) is None:
        raise InputError(f"platform {platform!r} is not a valid platform key; allowed: lowercase letters, "
                         "digits, '_' and '-'")
    return platform


def inside(root: str | Path, *parts: str) -> Path:
    """root/parts..., refused unless every part is one plain path component and the result stays under root.

    Symbolic links are resolved before the check, so a link planted inside root cannot lead out.
    """
    for part in parts:
        if not part or part in (".", "..") or any(c in part for c in "/\\\0\n\r"):
            raise InputError(f"{root}: refusing the path component {part!r}: it would leave {root}")
    path = Path(root).joinpath(*parts)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base) or path.resolve() == base:
        raise InputError(f"{path}: refusing to use it: it resolves to {path.resolve()}, outside {base}")
    return path


def check_writable_dir(path: Path, flag: str) -> Path:
    """That `path` is a directory this process may write in, or a new path under one; judged without writing.
    (On a read-only mount access(2) says no even to root.)"""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == path else f"lies under {existing}, which is not a directory"
        raise InputError(f"{flag} {path}: {what}; allowed: a directory or a new path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {existing} is not writable; allowed: a writable directory")
    return path
