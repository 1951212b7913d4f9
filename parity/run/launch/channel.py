"""Signed messages between the nodes of one run (parity.run.launch.nodes), over node 0's TCPStore.

Anyone who can reach the rendezvous port can list the store's keys, read them, set them and
delete them. So every parity message is signed (HMAC-SHA256, with the run's secret) over the key
it is posted under, the run it belongs to and its body: a message copied to another key, or
replayed from another run, does not verify. A reader acts only on a message that verifies; one
that does not is named (once, its content escaped and cut short) and the reader keeps waiting for
the genuine one. A writer puts back what it posted whenever it finds it overwritten or deleted.

The secret is the operator's PARITY_RDZV_SECRET where set (the SLURM job script makes one per
job), else a fresh one node 0 writes to OUT/.nodes/secret (mode 0600) before it opens the store,
for the other nodes to read from the shared run folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
import stat
import sys
import time
from pathlib import Path

from parity.core.errors import InputError
from parity.core.files import NotRegular, open_regular
from parity.core.records import atomic_open

SECRET_ENV = "PARITY_RDZV_SECRET"
SECRET_RULE = "32 to 1024 printable ASCII characters, no spaces (e.g. the output of `openssl rand -hex 32`)"
SECRET_PATTERN = re.compile(r"[\x21-\x7e]{32,1024}")
FILE_SECRET = re.compile(r"[0-9a-f]{64}\n?")  # what write_secret writes: secrets.token_hex(32)
MAX_MESSAGE = 64 * 1024  # bytes; a result's message is cut to 4000 characters, so this is ample
SHOWN = 100  # characters of a refused message's content shown in its line
MAX_NOTES = 20  # forged or overwritten messages a node lists; past it, only counted
MAX_UNLISTED = 10_000
KEEP_S = 0.25  # how often a node checks its own messages are still in place while it polls
# What a peek returns for a missing key: compare_set gives back its `expected` there. A key that
# really holds these bytes (someone set them) reads as missing, which is never acted on either.
_ABSENT = b"\0parity: no such key"


class Refused(Exception):
    """A message that must not be acted on; str(e) says why, in a few words."""


def env_secret(env=os.environ) -> bytes | None:
    """The operator's PARITY_RDZV_SECRET, checked (never echoed); None where it is unset."""
    value = env.get(SECRET_ENV)
    if value is None:
        return None
    if SECRET_PATTERN.fullmatch(value) is None:
        raise InputError(f"{SECRET_ENV}: {len(value)} characters, not all allowed; allowed: {SECRET_RULE}")
    return value.encode()


def write_secret(path: Path) -> bytes:
    """A fresh secret in `path`, mode 0600 from its creation, appearing whole (renamed into place)."""
    secret = secrets.token_hex(32)
    with atomic_open(path, permissions=0o600) as f:  # whatever the umask
        f.write(secret + "\n")
    return secret.encode()


def read_secret(path: Path) -> bytes:
    """The secret node 0 wrote, if `path` is a regular file (not a link) of ours, mode 0600, of the right form."""
    allowed = (f"allowed: the regular file node 0 writes there (yours, mode 0600, 64 hex digits), "
               f"or {SECRET_ENV} set alike on every node")
    try:  # a link is refused (not followed), a FIFO cannot hang us
        f = open_regular(path, follow_symlinks=False)
    except NotRegular as e:
        raise InputError(f"{path}: cannot read the run's secret, which is not a regular file ({e.kind}); "
                         f"{allowed}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the run's secret ({e.strerror}); {allowed}") from None
    with f:
        st = os.fstat(f.fileno())
        problem = (f"is owned by uid {st.st_uid}, not by you" if st.st_uid != os.getuid() else
                   f"has mode {stat.S_IMODE(st.st_mode):04o}" if stat.S_IMODE(st.st_mode) != 0o600 else None)
        text = f.read(200) if problem is None else b""
    if problem is None and FILE_SECRET.fullmatch(text.decode("ascii", "replace")) is None:
        problem = "does not hold 64 hex digits"
    if problem is not None:
        raise InputError(f"{path}: the run's secret {problem}; {allowed}")
    return text.strip()


def _mac(secret: bytes, text: str) -> str:
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, key: str, run: str, body: dict) -> bytes:
    """The message `body`, bound to the key it is posted under and to the run, with its MAC."""
    text = json.dumps({"key": key, "run": run, "body": body}, sort_keys=True)
    return json.dumps({"msg": text, "mac": _mac(secret, text)}).encode()


def verify(secret: bytes, key: str, raw: bytes, run: str) -> dict:
    """The body of a message read at `key`, if it was signed with `secret` for this key and run; else Refused."""
    if len(raw) > MAX_MESSAGE:
        raise Refused(f"malformed: {len(raw)} bytes, more than {MAX_MESSAGE}")
    try:
        outer = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested brackets, thousands deep
        outer = None
    if not (isinstance(outer, dict) and set(outer) == {"msg", "mac"} and all(isinstance(v, str) for v in outer.values())):
        raise Refused("malformed: not a signed parity message")
    if not hmac.compare_digest(outer["mac"].encode(), _mac(secret, outer["msg"]).encode()):
        raise Refused("bad signature")
    try:
        inner = json.loads(outer["msg"])
    except (ValueError, RecursionError):
        inner = None
    if not (isinstance(inner, dict) and set(inner) == {"key", "run", "body"} and isinstance(inner["key"], str)
            and isinstance(inner["run"], str) and isinstance(inner["body"], dict)):
        raise Refused("malformed: its signed part is not a parity message")
    if inner["key"] != key:
        raise Refused(f"wrong key binding: signed for {shown(inner['key'])}")
    if inner["run"] != run:
        raise Refused(f"wrong run: signed for run {shown(inner['run'])}, not {run or 'the handshake'}")
    return inner["body"]


def shown(value) -> str:
    """Content from the wire, escaped to printable ASCII and cut short: safe to print on one line."""
    cut = isinstance(value, (str, bytes, list)) and len(value) > SHOWN  # a value may be megabytes
    text = ascii(value[:SHOWN] if cut else value)
    return text[:SHOWN] + "..." if cut or len(text) > SHOWN else text


def peek(store, key: str) -> bytes | None:
    """The value at `key`, or None; never waits (store.get would block while the key is missing,
    and a key can be deleted between a check and a get)."""
    value = store.compare_set(key, _ABSENT, _ABSENT)
    return None if value == _ABSENT else value


def pause(seconds: float) -> None:
    """A poll's wait, jittered: a reader in step with someone who overwrites a key at its own pace
    would read the forged value every time, and its writer would put the genuine one back in vain."""
    time.sleep(seconds * random.uniform(0.5, 1.5))


class Channel:
    """This node's side of the store: signed posts it keeps in place, verified reads, and what it refused."""

    def __init__(self, store, secret: bytes, rank: int, run: str = ""):
        self.store, self.secret, self.rank, self.run = store, secret, rank, run
        self.posted: dict[str, bytes] = {}
        self.notes: dict[tuple, str] = {}  # (key, what) -> its line, in the order seen
        self.unlisted: set[tuple] = set()  # past MAX_NOTES, only counted (and the count capped)
        self._kept = 0.0

    def post(self, key: str, body: dict, run: str | None = None) -> None:
        raw = sign(self.secret, key, self.run if run is None else run, body)
        self.posted[key] = raw
        self.store.set(key, raw)

    def read(self, key: str, check=None, run: str | None = None) -> dict | None:
        """The genuine message at `key` (its body, accepted by `check`, which raises Refused), or None
        while there is none: a message that fails is named and skipped, and the caller polls again."""
        self.keep_posted()
        raw = peek(self.store, key)
        if raw is None:
            return None
        try:
            body = verify(self.secret, key, raw, self.run if run is None else run)
            if check is not None:
                check(body)
        except Refused as e:
            reason = str(e)
            self.note((key, reason.split(":")[0]), f"refused {key} ({reason}): {shown(raw)}")
            return None
        return body

    def keep_posted(self) -> None:
        """Put back any message of ours that someone overwrote or deleted (checked every KEEP_S at most)."""
        if time.monotonic() - self._kept < KEEP_S:
            return
        self._kept = time.monotonic()
        for key, raw in self.posted.items():
            now = peek(self.store, key)
            if now != raw:
                self.store.set(key, raw)
                self.note(("put back", key), f"put back {key}, found " +
                          ("deleted" if now is None else f"overwritten with {shown(now)}"))

    def note(self, what: tuple, line: str) -> None:
        """Name a forged or overwritten message once (per key and reason), up to MAX_NOTES of them."""
        if what in self.notes:
            return
        if len(self.notes) >= MAX_NOTES:
            if len(self.unlisted) < MAX_UNLISTED:
                self.unlisted.add(what)
            return
        self.notes[what] = line
        print(f"parity: node {self.rank}: {line}", file=sys.stderr, flush=True)

    def report(self) -> list[str]:
        """What this node refused or put back, for node 0 (bounded: MAX_NOTES lines and a count)."""
        more = [f"refused or put back {len(self.unlisted)} more message(s), not listed"] if self.unlisted else []
        return list(self.notes.values()) + more


def is_report(value) -> bool:
    """A node's report() as another node receives it: a short list of short printable ASCII lines."""
    return (isinstance(value, list) and len(value) <= MAX_NOTES + 1 and
            all(isinstance(v, str) and len(v) <= 2 * SHOWN + 200 and v.isascii() and v.isprintable() for v in value))
