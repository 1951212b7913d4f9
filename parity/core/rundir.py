"""A run directory (`--out`): what parity may write there, and how it knows what it wrote.

parity writes two kinds of entries at the top of a run directory:
- case folders, each marked with a `.parity-case` file (paths.CASE_MARKER) when it is created;
- everything else (report.md, report.html, plan files, lock files, launch work folders, node
  logs, a SLURM job script), each listed by name in the run marker `.parity-run` before it is created.

A run may start only in a new or empty folder, or in one whose every entry is one of those: a
folder that holds anything else is someone's other work, and parity refuses it with one line
rather than overwrite or delete a byte of it. The marker, not a file's name, says what is ours: a
user's own `report.md` in `--out` is refused, not replaced.

The run directory and the baseline root must never overlap: a run replaces its case folders, so a
baseline root inside (or equal to) `--out` would be deleted by the next run, and a run directory
inside the baseline root would be read as baselines.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from parity.core import files

from parity.core import records
from parity.core.errors import InputError
from parity.core.paths import CASE_MARKER, check_writable_dir, inside

RUN_MARKER = ".parity-run"
MARKER_KIND = "parity run directory"
SHOWN = 5  # foreign entries named in the refusal


def check_apart(out: Path, baselines: Path, out_flag: str = "--out", baselines_flag: str = "--baselines") -> None:
    """Refuse a run directory and a baseline root that are the same folder or lie one inside the other."""
    a, b = Path(out).resolve(), Path(baselines).resolve()
    if a == b:
        how = "are the same folder"
    elif a.is_relative_to(b):
        how = "overlap: the run directory lies inside the baseline root"
    elif b.is_relative_to(a):
        how = "overlap: the baseline root lies inside the run directory, whose case folders each run replaces"
    else:
        return
    raise InputError(f"{out_flag} {out} and {baselines_flag} {baselines} {how} ({a}, {b}); allowed: two "
                     "separate folders, neither inside the other")


def ours(out: Path) -> set[str]:
    """The top-level names the run marker lists (empty where there is no marker); a bad marker is bad input."""
    path = Path(out) / RUN_MARKER
    if not path.exists() and not path.is_symlink():
        return set()
    if path.is_symlink():
        raise InputError(f"{path}: a symbolic link; allowed: the run marker parity writes, a regular file")
    try:
        doc = json.loads(files.read_text(path, limit=1 << 20))
    except OSError as e:
        raise InputError(f"{path}: cannot read the run marker ({e.strerror})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{path}: not a run marker ({e}); allowed: the JSON file parity writes") from None
    entries = doc.get("entries") if isinstance(doc, dict) and doc.get("kind") == MARKER_KIND else None
    if not isinstance(entries, list) or not all(isinstance(e, str) and _plain(e) for e in entries):
        raise InputError(f"{path}: not a run marker (kind and entries); allowed: the JSON file parity writes")
    return set(entries)


def foreign_entries(out: Path) -> list[str]:
    """Entries at the top of `out` that parity did not write, sorted."""
    out = Path(out)
    if not out.is_dir():
        return []
    listed = ours(out) | {RUN_MARKER}
    # An atomic write of a listed file (another process's, now; or one a killed run left) is ours too.
    return sorted(e.name for e in out.iterdir()
                  if e.name not in listed and records.being_written(e.name) not in listed and not _marked_case_dir(e))


def _marked_case_dir(entry: Path) -> bool:
    return entry.is_dir() and not entry.is_symlink() and (entry / CASE_MARKER).is_file()


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0\n\r")


def check_out(out: Path, flag: str = "--out") -> Path:
    """Whether `out` can become a run directory, judged without writing anything."""
    out = check_writable_dir(out, flag)
    if not out.is_dir():
        return out
    with _locked(out):  # pytest-xdist workers make and replace case folders in it now
        foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more"
                                                                if len(foreign) > SHOWN else "")
        raise InputError(f"{flag} {out}: holds {shown}, which parity did not write; allowed: a new or empty "
                         "folder, or a run directory of parity's")
    return out


def prepare_out(out: Path, flag: str = "--out") -> Path:
    """The run directory, created if need be and marked; any reason it cannot hold a run is bad input, found now."""
    out = check_out(out, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _locked(out):  # writing the marker is the proof that the folder is writable
            _write_marker(out, ours(out))
    except OSError as e:
        raise InputError(f"{flag} {out}: cannot write there ({e.strerror}); allowed: a writable directory") from None
    return out


def claim(out: Path, name: str) -> Path:
    """out/name, listed in the run marker before the caller writes it (so a later run knows it is ours).
    An entry of that name that parity did not write is refused, never overwritten."""
    path = inside(out, name)
    with _locked(out):
        listed = ours(out)
        if name not in listed:
            if path.exists() or path.is_symlink():
                raise InputError(f"{path}: exists and parity did not write it; refusing to overwrite it; "
                                 "allowed: move it away, or use a run directory of parity's")
            _write_marker(out, listed | {name})
    return path


@contextmanager
def work_dir(out: Path, prefix: str):
    """A new work folder under `out`, listed in the marker while it exists (one a killed run leaves stays ours)."""
    with _locked(out):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
        _write_marker(out, ours(out) | {path.name})
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with _locked(out):
            _write_marker(out, ours(out) - {path.name})


def clear_earlier_outputs(out: Path) -> None:
    """Delete an earlier session's case folders and the files the marker lists (lock files stay:
    another process may hold one). Nothing else is touched."""
    if not Path(out).is_dir():
        return
    with _locked(out):
        listed = ours(out)
        for entry in Path(out).iterdir():
            if _marked_case_dir(entry):
                shutil.rmtree(entry)
            elif entry.name in listed and entry.is_file() and not entry.name.endswith(".lock"):
                entry.unlink()
        _write_marker(out, {n for n in listed if (Path(out) / n).exists()})


@contextmanager
def _locked(out: Path):
    """The run marker's read-modify-write, one process at a time (pytest-xdist workers share --out)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_marker(out: Path, names: set[str]) -> None:
    keep = sorted(n for n in names if n != RUN_MARKER)
    records.atomic_write_text(Path(out) / RUN_MARKER, json.dumps({"kind": MARKER_KIND, "entries": keep}, indent=1) + "\n")


@contextmanager
def case_lock(out: Path, case_name: str):
    """One run of a case into one --out at a time: a second one fails at once instead of mixing files."""
    path = claim(out, f".{case_name}.lock")
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out / case_name}: another parity run is writing this case now; wait for it "
                             "or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fresh_case_dir(out: Path, case_name: str) -> Path:
    """An empty <out>/<case>/, marked as ours. An older folder is deleted only if it carries our mark."""
    case_dir = inside(out, case_name)
    with _locked(out):  # so that no other process sees it unmarked, half made or half deleted
        if case_dir.is_symlink() or (case_dir.exists() and not (case_dir / CASE_MARKER).is_file()):
            raise InputError(f"{case_dir}: exists and was not made by parity; refusing to delete it; "
                             "allowed: move it away or choose another --out")
        if case_dir.exists():
            shutil.rmtree(case_dir)  # stale files from an older run must never be compared
        case_dir.mkdir()
        (case_dir / CASE_MARKER).write_text(case_name + "\n")
    return case_dir
