"""The content-addressed seed cache: a checkpoint built once per key, named by the hash of its files.

Layout of the cache (default ~/.cache/parity/seeds, or $PARITY_CACHE):
    <cache>/<sha256>/            a torch.distributed.checkpoint directory, named by the hash of its files
    <cache>/keys/<key>.txt       which hash a key (a trainer's description of what it built) resolved to
    <cache>/.corrupt-<sha256>-<utc time>   an entry that failed its check, moved aside for inspection

The hash (`files_sha256`) covers the sorted file names and bytes of `.metadata` and every `*.distcp`
shard; any other file in the directory makes it corrupt. Every entry is checked against its name in
the host before each launch, and a bad one is moved aside and rebuilt. Builders write through
`deterministic_writer`, so a rebuilt entry keeps its hash and the `seed_checkpoint_sha256` that
baselines record stays valid. A fully built cache is used read-only; the lock file is opened only
when something must be built. What a trainer builds into it: parity.trainers.seed (parity's own
model), parity.trainers.torchtitan (torchtitan's).

Trust boundary: DCP reads `.metadata` with pickle, so loading a checkpoint can run code. Only name a
`seed_checkpoint` you trust, and keep the cache writable by you alone: it is created 0700 for that
reason. The content hash detects accidental corruption, not a deliberate forgery by someone who can
write the cache.
"""


from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from parity.core.errors import InputError

_CHUNK = 1 << 20
_SHA = re.compile(r"[0-9a-f]{64}")
# Errors that mean "this entry is damaged" rather than "this cache cannot be used": missing file,
# a file where a directory should be (or the reverse), a symlink refused by O_NOFOLLOW.
_DAMAGE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}


class SeedInfo(NamedTuple):
    path: Path
    sha256: str
    notes: tuple[str, ...] = ()  # one line each: what was found wrong and repaired on the way


class SeedBuildError(Exception):
    """A trainer failed to build the case's seed checkpoint: every setup of the case fails with this."""


class Corrupt(Exception):
    """A checkpoint directory that is not exactly `.metadata` plus `*.distcp` regular files."""


def default_cache() -> Path:
    if os.environ.get("PARITY_CACHE"):
        return Path(os.environ["PARITY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "parity" / "seeds"


def files_sha256(path: Path) -> str:
    """sha256 over sorted (name, size, bytes) of `.metadata` and `*.distcp`; raises Corrupt or OSError.

    Nothing is followed: the directory and each file are opened with O_NOFOLLOW, so a symlink placed
    in the cache can neither point the check elsewhere nor be hashed as if it were the entry.
    """
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        names = sorted(os.listdir(dfd))
        extra = [n for n in names if n != ".metadata" and not n.endswith(".distcp")]
        if extra:
            raise Corrupt(f"unexpected file {extra[0]!r}")
        if ".metadata" not in names:
            raise Corrupt("no .metadata")
        if len(names) < 2:
            raise Corrupt("no *.distcp shard")
        h = hashlib.sha256()
        for name in names:
            # O_NONBLOCK: a FIFO named like a shard must fail the check, not hang it.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(fd)
                if not stat.S_ISREG(size.st_mode):
                    raise Corrupt(f"{name!r} is not a regular file")
                h.update(f"{name}\0{size.st_size}\0".encode())
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(dfd)


def verify(path: Path, sha256: str) -> bool:
    """True iff the checkpoint's files still hash to sha256 (call after a launch: did it change?)."""
    try:
        return files_sha256(Path(path)) == sha256
    except (OSError, Corrupt):
        return False


def check_readable(path: Path) -> None:
    """InputError unless DCP can read the checkpoint's metadata (this unpickles it: trusted input only)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # pickle and DCP raise many types for a garbage file; all mean the same here
        raise InputError(f"seed_checkpoint {path}: .metadata cannot be read ({type(e).__name__}: {e}); "
                         "name a directory written by torch.distributed.checkpoint.save") from None


def cached_build(cache: Path | None, key: str, what: str, write) -> SeedInfo:
    """The cache entry for `key`, verified, or built by `write(empty_dir)` and hashed. `what` names the
    entry in notes."""
    cache = (Path(cache) if cache else default_cache()).absolute()  # ranks may run in another directory
    try:
        return _cached(cache, key, what, write)
    except OSError as e:
        raise InputError(f"seed cache {cache}: {e.strerror or e}; set PARITY_CACHE "
                         "to a directory you can write") from None


def external_seed(path: Path) -> SeedInfo:
    """A case's own seed_checkpoint, hashed and its metadata read now; anything wrong with it is an InputError."""
    path = Path(path)
    try:
        sha = files_sha256(path)
    except (OSError, Corrupt) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(f"seed_checkpoint {path}: {why}; it must be a directory holding only "
                         ".metadata and *.distcp files") from None
    check_readable(path)
    return SeedInfo(path, sha)


def _cached(cache: Path, key: str, what: str, write) -> SeedInfo:
    key_file = cache / "keys" / f"{key}.txt"
    # Read-only first: a good, complete cache is used without creating or writing anything.
    sha, problem = _lookup(cache, key_file)
    if problem is None:
        return SeedInfo(cache / sha, sha)
    with _locked(cache):
        notes = []
        sha, problem = _lookup(cache, key_file)  # another builder may have repaired it meanwhile
        if problem is None:
            return SeedInfo(cache / sha, sha)
        if problem != "not built yet":
            # A garbage key names no entry; the key file itself is the bad part then.
            bad = cache / sha if sha else key_file
            if problem == "is missing":
                notes.append(f"{what}: {bad} {problem}; rebuilt")
            else:
                moved = _move_aside(cache, bad, sha or key_file.stem)
                notes.append(f"{what}: {bad} {problem}; moved to {moved.name} and rebuilt")
        for dead in cache.glob(".building-*"):  # builders hold the lock: these are from killed ones
            shutil.rmtree(dead, ignore_errors=True)
        new = _build(cache, write, notes, what)
        if sha and new != sha:
            notes.append(f"{what}: the rebuilt checkpoint's hash {new} differs from the cached {sha}")
        _write_key(key_file, new)
        return SeedInfo(cache / new, new, tuple(notes))


def _lookup(cache: Path, key_file: Path) -> tuple[str | None, str | None]:
    """(hash, None) when the key names an entry that verifies; otherwise (hash or None, what is wrong)."""
    try:
        with open(key_file, "rb") as f:
            text = f.read(200).decode("ascii", "replace").strip()
    except OSError as e:
        if e.errno == errno.EISDIR:
            return None, "is not a file (garbage key file)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and not _is_file(cache):
            return None, "not built yet"
        raise
    if not _SHA.fullmatch(text):  # never used as a path unless it is a hash: "../x" must not escape
        return None, "is not a sha256 (garbage key file)"
    return text, _entry_problem(cache / text, text)


def _is_file(cache: Path) -> bool:
    # A regular file where the cache directory should be would otherwise read as "not built yet".
    return cache.exists() and not cache.is_dir()


def _entry_problem(entry: Path, sha: str) -> str | None:
    try:
        got = files_sha256(entry)
    except Corrupt as e:
        return f"is corrupt ({e})"
    except OSError as e:
        if e.errno not in _DAMAGE:
            raise  # unreadable, I/O error: the cache is unusable, not this entry
        return "is missing" if e.errno == errno.ENOENT and not os.path.lexists(entry) else f"is corrupt ({e.strerror})"
    return None if got == sha else f"is corrupt (its files hash to {got})"


def _move_aside(cache: Path, bad: Path, label: str) -> Path:
    """Rename (never delete, never follow) a bad entry to a name no lookup will use."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = cache / f".corrupt-{label}-{stamp}"
    if os.path.lexists(bad):
        os.rename(bad, target)  # renames a symlink itself, not what it points to
    return target


@contextmanager
def _locked(cache: Path):
    """Serialise builders (pytest-xdist workers, two CLI runs); only taken when something must be written."""
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: the metadata inside is unpickled
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def deterministic_writer(path: str):
    from torch.distributed.checkpoint import FileSystemWriter

    class _DeterministicWriter(FileSystemWriter):
        # DCP's default .metadata records the directory it was saved to and a random save id: two
        # builds of the same weights would differ in bytes and so in hash. Neither is needed to load.
        def storage_meta(self):
            return None

    return _DeterministicWriter(path)


def _build(cache: Path, write, notes: list, what: str) -> str:
    """write() the checkpoint into a temp dir inside the cache, hash it, rename it into place; returns the hash."""
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".building-"))
    try:
        write(tmp)
        sha = files_sha256(tmp)
        final = cache / sha
        problem = _entry_problem(final, sha)
        if problem not in (None, "is missing"):  # a damaged entry under this name that no key pointed at
            moved = _move_aside(cache, final, sha)
            notes.append(f"{what}: {final} {problem}; moved to {moved.name} and rebuilt")
        if problem is not None:
            os.rename(tmp, final)
        return sha
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename; a failed build's leftovers


def _write_key(key_file: Path, sha: str) -> None:
    key_file.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.tmp")
    tmp.write_text(sha + "\n")
    os.replace(tmp, key_file)
