"""One run across nodes: `parity run CASES --nnodes N --node-rank R --rdzv-endpoint HOST:PORT` on each node.

Node 0 plans, launches, judges and reports, as on one node. Its `parity` hosts a TCPStore at
HOST:PORT for the whole run, listening on that address only, and every torchrun (on every node)
uses it for its c10d rendezvous: torchrun finds the port taken and joins as a client, each launch
under its own rendezvous id. The same store carries parity's own messages, so there is one port to
open and nothing stale to mistake for this run (the store lives and dies with node 0's process).

Anyone who reaches the port can read, set and delete keys, so every parity message is signed with
the run's secret and bound to its key and run (parity.run.launch.channel): a forged, copied or replayed
one is named and never acted on, and each writer puts back a message of its own it finds changed.

    parity/claim/R     a counter every node R > 0 adds 1 to: a second node claiming rank R is refused
    parity/hello/R     node R's digest of its arguments (cases and their files, steps, device, plan)
                       and a fresh nonce
    parity/go/R        node 0's answer to that nonce: the run id every later message is bound to,
                       and "" to go on or why not (the digests differ)
    parity/run/launch/K    node 0's K-th launch: its name, plan file, the plan's sha256 and the timeout;
                       or {"done": code}
    parity/result/L/R  how launch L ended on node R (each node stops its part when another's failed),
                       with the forged messages node R has refused so far
    parity/bye/R       node R read "done" (or a refusal), with the forged messages it refused; node 0
                       may close the store

The other nodes start nothing of their own: for each launch they run torchrun with the plan file
node 0 wrote, once they have checked that it lies in their own --out, hashes to what node 0
announced and splits over the nodes; so the run directory and the seed checkpoints must be on a
filesystem every node shares. Their torchrun logs go to OUT/.nodes/nodeR/ (a name no case can
have), beside node 0's secret file where PARITY_RDZV_SECRET is not set. No file lock is taken
across nodes: only node 0 writes anything but those logs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from parity.core import files
from parity.core.errors import InputError
from parity.run.launch.channel import Channel, Refused, is_report, pause, read_secret, shown, write_secret
from parity.core.process import LaunchResult, process_env, run_process
from parity.run.launch.torchrun import torchrun_argv
from parity.run.plan import in_ranks
from parity.core.paths import inside, name_problem
from parity.core.rundir import RUN_MARKER, claim

POLL_S = 0.5
BYE_WAIT_S = 60.0  # how long node 0 keeps the store open for the others to read "done"
PEER_RESULT_WAIT_S = 20.0  # after a failed launch, how long node 0 waits to name what the others saw
SECRET_WAIT_S = 30.0  # how long a node waits for node 0's secret file to show on the shared filesystem
NODE_LOGS = ".nodes"
STATUSES = ("ok", "failed", "timeout", "interrupted")
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # the command line's --timeout bound
MAX_PLAN_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Nodes:
    count: int
    rank: int
    host: str
    port: int

    @property
    def leads(self) -> bool:
        return self.rank == 0

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def ranks_per_node(self, world_size: int) -> int:
        return world_size // self.count

    def rendezvous(self, launch_name: str, join_timeout_s: float) -> list[str]:
        """torchrun's arguments for this node's part of a launch: c10d rendezvous on node 0's store."""
        return [f"--nnodes={self.count}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id=parity-{launch_name}", f"--rdzv-conf=is_host=false,join_timeout={int(join_timeout_s)}",
                "--max-restarts=0"]

    def where(self) -> str:
        return f"node {self.rank} of {self.count} (rendezvous {self.endpoint})"


def parse_nodes(count: int, rank: int | None, endpoint: str | None) -> Nodes | None:
    """The command line's --nnodes/--node-rank/--rdzv-endpoint, checked; None for a run on one node."""
    if count == 1:
        if rank not in (None, 0) or endpoint is not None:
            raise InputError("--node-rank and --rdzv-endpoint need --nnodes 2 or more; allowed: leave them out "
                             "for a run on one node")
        return None
    if rank is None or endpoint is None:
        raise InputError(f"--nnodes {count} needs --node-rank (0 to {count - 1}) and --rdzv-endpoint HOST:PORT "
                         "(node 0's address; node 0 hosts the rendezvous there)")
    if not 0 <= rank < count:
        raise InputError(f"--node-rank {rank}: allowed: 0 to {count - 1} with --nnodes {count}")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(f"--rdzv-endpoint {endpoint!r}: allowed: HOST:PORT with a port from 1 to 65535")
    return Nodes(count, rank, host.strip("[]"), int(port))


def check_splits(count: int, cases) -> None:
    """Every setup must split evenly over `count` nodes and be one parity trains itself."""
    for case in cases:
        for s in case.setups:
            if not in_ranks(s.trainer):
                raise InputError(f"{case.path}: setups.{s.name}: trainer {s.trainer!r} runs on one node only; "
                                 f"allowed with --nnodes {count}: built-in setups")
            if s.world_size % count:
                raise InputError(f"{case.path}: setups.{s.name}: world size {s.world_size} does not split evenly "
                                 f"over --nnodes {count}; allowed: world sizes that are multiples of {count}")


def digest(parts) -> str:
    """What every node must agree on before anything runs, as one hash."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _listen(nodes: Nodes) -> int:
    """A socket listening on the endpoint's own address, as a descriptor for the store: TCPStore left
    to itself listens on every interface, so anyone reaching any address of node 0 could join."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(nodes.host, nodes.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:  # socket.gaierror too
        raise InputError(f"--rdzv-endpoint {nodes.endpoint}: node 0 cannot resolve {nodes.host!r} "
                         f"({e.strerror or e}); allowed: node 0's own host name or address") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last run's port may linger in TIME_WAIT
        sock.bind(address)
        sock.listen()
    except OSError as e:
        sock.close()
        raise InputError(f"--rdzv-endpoint {nodes.endpoint}: node 0 cannot host the rendezvous there "
                         f"({e.strerror}); allowed: a free port on node 0's own address") from None
    # The store adopts the descriptor and closes it when it is destroyed; detached, the socket object
    # neither closes it under the store nor closes it a second time later (perhaps someone else's by then).
    return sock.detach()


def _store(nodes: Nodes, serve: bool, timeout_s: float):
    from torch.distributed import TCPStore

    fd = _listen(nodes) if serve else None
    try:
        return TCPStore(nodes.host, nodes.port, is_master=serve, wait_for_workers=False, master_listen_fd=fd,
                        timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, TimeoutError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        first = str(e).splitlines()[0]
        if serve:
            raise InputError(f"--rdzv-endpoint {nodes.endpoint}: node 0 cannot host the rendezvous "
                             f"there ({first}); allowed: a free port on node 0's own address") from None
        raise InputError(f"--rdzv-endpoint {nodes.endpoint}: no node 0 answered within "
                         f"{timeout_s:.0f} s ({first}); start `parity run ... --node-rank 0` there") from None


# What each message may hold: every field of every message is checked before it is used.

def _fields(body: dict, **tests) -> None:
    """Refused unless `body` has exactly these fields and each passes its test."""
    if set(body) != set(tests):
        raise Refused(f"malformed: fields {shown(sorted(body))}, expected {sorted(tests)}")
    for name, test in tests.items():
        if not test(body[name]):
            raise Refused(f"malformed: field {name} = {shown(body[name])}")


def _hex(digits: int):
    return lambda v: isinstance(v, str) and re.fullmatch(f"[0-9a-f]{{{digits}}}", v) is not None


def _text(limit: int):
    return lambda v: isinstance(v, str) and len(v) <= limit and "\0" not in v


def _seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= MAX_TIMEOUT_S


def check_hello(body: dict) -> None:
    _fields(body, digest=_hex(64), nonce=_hex(32))


def check_go(nonce: str):
    """node 0's answer to the hello with this nonce: one that answers another hello is a replay."""
    def check(body: dict) -> None:
        _fields(body, nonce=_hex(32), run=_hex(32), refusal=_text(2000))
        if body["nonce"] != nonce:
            raise Refused("wrong run: it answers another hello (replayed from an older run?)")
    return check


def check_launch(body: dict) -> None:
    if "done" in body:
        _fields(body, done=lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255)
    else:
        _fields(body, name=lambda v: name_problem(v) is None, plan=_text(4096), sha256=_hex(64), timeout_s=_seconds)


def check_result(body: dict) -> None:
    _fields(body, status=lambda v: v in STATUSES, message=_text(8000), forged=is_report)


def check_bye(body: dict) -> None:
    _fields(body, forged=is_report)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Group:
    """The messages every node sends and reads."""

    def __init__(self, nodes: Nodes, store, channel: Channel):
        self.nodes, self.store, self.channel = nodes, store, channel

    def post_result(self, name: str, result: LaunchResult) -> None:
        self.channel.post(f"parity/result/{name}/{self.nodes.rank}", {
            "status": result.status, "message": result.message[-4000:], "forged": self.channel.report()})

    def result(self, name: str, rank: int) -> dict | None:
        body = self.channel.read(f"parity/result/{name}/{rank}", check_result)
        if body is not None:
            self.heard(rank, body["forged"])
        return body

    def heard(self, rank: int, forged: list[str]) -> None:
        """What node `rank` refused; node 0 names it."""

    def failure_elsewhere(self, name: str):
        """For run_process's `abort`: the first other node whose part of the launch failed, as a message."""
        def check() -> str | None:
            for r in range(self.nodes.count):
                if r != self.nodes.rank and (res := self.result(name, r)) and res["status"] != "ok":
                    return f"stopped: node {r}'s part of {name} ended first ({res['status']})"
            return None
        return check


class Leader(_Group):
    """Node 0: hosts the store, waits for every node to agree, announces each launch.

    `secret`: the operator's PARITY_RDZV_SECRET; None: a fresh one in OUT/.nodes/secret, written
    before the store opens (so a node that reaches the store reads this run's) and removed at the end."""

    def __init__(self, nodes: Nodes, agreed: str, out: Path, timeout_s: float, secret: bytes | None):
        self.created: list[Path] = []  # the secret file and what was made for it: removed if the run cannot start
        self.secret_file: Path | None = None
        self.announced = 0
        self.claims: set[int] = set()  # the ranks a second node was refused, named
        self.said: set[tuple] = set()  # the other nodes' reports, named
        try:
            secret = secret or self._new_secret(out)
            store = _store(nodes, serve=True, timeout_s=timeout_s)
            super().__init__(nodes, store, Channel(store, secret, 0, run=secrets.token_hex(16)))
            self._handshake(agreed, timeout_s)
        except BaseException:
            self.close()  # bad input writes nothing
            raise

    def _new_secret(self, out: Path) -> bytes:
        path = inside(out, NODE_LOGS, "secret")
        try:
            self.created = [d for d in (out, *out.parents) if not d.exists()][::-1]
            for d in self.created:
                d.mkdir()
            self.created += [p for p in (out / RUN_MARKER, path.parent) if not p.exists()]
            claim(out, NODE_LOGS).mkdir(exist_ok=True)  # listed in the run marker: the run that follows knows it
            secret = write_secret(path)
        except OSError as e:
            raise InputError(f"{path}: node 0 cannot write the run's secret there ({e.strerror}); allowed: "
                             f"a writable --out, or PARITY_RDZV_SECRET set alike on every node") from None
        self.created.append(path)
        self.secret_file = path
        return secret

    def close(self) -> None:
        """Remove the secret file and the folders made for it (those that are empty: a run has filled --out)."""
        for p in reversed(self.created):
            try:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass
        self.created = []

    def _handshake(self, agreed: str, timeout_s: float) -> None:
        hellos = self._await_hellos(timeout_s)
        differ = [r for r, hello in hellos.items() if hello["digest"] != agreed]
        refusal = "" if not differ else (f"node(s) {', '.join(map(str, differ))} were given other cases, case files "
                                         "or options (--steps, --device, --repeat, --plan) than node 0")
        for r, hello in hellos.items():  # bound by the nonce, not yet by the run: the go message names the run
            self.channel.post(f"parity/go/{r}", {"nonce": hello["nonce"], "run": self.channel.run, "refusal": refusal},
                              run="")
        if differ:
            self._wait_for_byes()  # the store must outlive their reading of the refusal
            raise InputError(refusal)

    def _await_hellos(self, timeout_s: float) -> dict[int, dict]:
        hellos: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            self._name_claims()
            for r in range(1, self.nodes.count):
                if r not in hellos and (hello := self.channel.read(f"parity/hello/{r}", check_hello, run="")):
                    hellos[r] = hello
            if len(hellos) == self.nodes.count - 1:
                return hellos
            if time.monotonic() > deadline:
                missing = [r for r in range(1, self.nodes.count) if r not in hellos]
                hint = ("; node 0 refused messages that failed verification (above): give every node the same "
                        "PARITY_RDZV_SECRET, or none" if self.channel.notes else "")
                raise InputError(f"--nnodes {self.nodes.count}: node(s) {', '.join(map(str, missing))} did not join "
                                 f"within {timeout_s:.0f} s; start `parity run ... --node-rank R --rdzv-endpoint "
                                 f"{self.nodes.endpoint}` on every node{hint}")
            pause(POLL_S)

    def _name_claims(self) -> None:
        """Name, once, each rank a second node tried to join as (that node refused itself, exit 2)."""
        for r in range(1, self.nodes.count):
            if r not in self.claims and self.store.add(f"parity/claim/{r}", 0) > 1:
                self.claims.add(r)
                print(f"parity: node 0: another node also tried to join as --node-rank {r}; it was refused",
                      file=sys.stderr, flush=True)

    def heard(self, rank: int, forged: list[str]) -> None:
        for line in forged:
            if (rank, line) not in self.said:
                self.said.add((rank, line))
                print(f"parity: node 0: node {rank} {line}", file=sys.stderr, flush=True)

    def announce(self, name: str, plan_path: Path, timeout_s: float) -> None:
        """Launch `name` on every node: the plan file (written, not yet run) and the hash of its bytes."""
        self.announced += 1
        self.channel.post(f"parity/run/launch/{self.announced}", {
            "name": name, "plan": str(plan_path.resolve()), "sha256": sha256(plan_path.read_bytes()),
            "timeout_s": timeout_s})

    def others_said(self, name: str) -> str:
        """What the other nodes reported of a failed launch, waiting a little for the slower ones."""
        deadline = time.monotonic() + PEER_RESULT_WAIT_S
        said = {}
        while len(said) < self.nodes.count - 1 and time.monotonic() < deadline:
            said |= {r: res for r in range(1, self.nodes.count) if r not in said and (res := self.result(name, r))}
            pause(POLL_S)
        return "\n".join(f"node {r}: {res['status']}: {res['message']}" if r in said
                         else f"node {r}: no report within {PEER_RESULT_WAIT_S:.0f} s (its parity may be gone)"
                         for r in range(1, self.nodes.count) for res in [said.get(r)])

    def finish(self, code: int) -> None:
        """Tell every node the run is over (with the exit code they should give), then wait for them to read it."""
        self.announced += 1
        self.channel.post(f"parity/run/launch/{self.announced}", {"done": code})
        self._wait_for_byes()
        self._name_claims()
        self.created = [p for p in self.created if p == self.secret_file]  # --out, its marker and logs stay
        self.close()

    def _wait_for_byes(self) -> None:
        byes: set[int] = set()
        deadline = time.monotonic() + BYE_WAIT_S
        while len(byes) < self.nodes.count - 1 and time.monotonic() < deadline:
            for r in set(range(1, self.nodes.count)) - byes:
                if (bye := self.channel.read(f"parity/bye/{r}", check_bye)) is not None:
                    byes.add(r)
                    self.heard(r, bye["forged"])
            pause(POLL_S)


def follow(nodes: Nodes, agreed: str, out: Path, timeout_s: float, secret: bytes | None) -> int:
    """Node R > 0: join node 0, run torchrun for each launch it announces, and return its exit code.
    `secret`: the operator's PARITY_RDZV_SECRET; None: the one node 0 wrote to OUT/.nodes/secret."""
    store = _store(nodes, serve=False, timeout_s=timeout_s)
    try:
        if store.add(f"parity/claim/{nodes.rank}", 1) > 1:
            raise InputError(f"--node-rank {nodes.rank}: another node already joined as --node-rank {nodes.rank}; "
                             f"allowed: a rank from 1 to {nodes.count - 1} that no other node of this run has")
        channel = Channel(store, secret or _file_secret(out), nodes.rank)
        group = _Group(nodes, store, channel)
        refusal = _join(channel, nodes.rank, agreed, timeout_s)
        if refusal:
            channel.post(f"parity/bye/{nodes.rank}", {"forged": channel.report()})
            raise InputError(refusal)
        print(f"parity: {nodes.where()}: following node 0", flush=True)
        return _follow_launches(nodes, group, out)
    except RuntimeError as e:  # the store's connection: node 0's parity is gone
        print(f"parity: {nodes.where()}: lost node 0 ({str(e).splitlines()[0]}); exiting", file=sys.stderr)
        return 1


def _file_secret(out: Path) -> bytes:
    """The secret node 0 wrote before opening the store we reached (given a moment to show on a shared filesystem)."""
    path = inside(out, NODE_LOGS, "secret")
    deadline = time.monotonic() + SECRET_WAIT_S
    while not os.path.lexists(path) and time.monotonic() < deadline:
        pause(POLL_S)
    return read_secret(path)


def _join(channel: Channel, rank: int, agreed: str, timeout_s: float) -> str:
    """Say hello with a fresh nonce and wait for node 0's answer to it: the run (set on the channel), and
    "" to go on or why not."""
    nonce = secrets.token_hex(16)
    channel.post(f"parity/hello/{rank}", {"digest": agreed, "nonce": nonce}, run="")
    deadline = time.monotonic() + timeout_s
    while (go := channel.read(f"parity/go/{rank}", check_go(nonce), run="")) is None:
        if time.monotonic() > deadline:
            raise InputError(f"node {rank}: node 0 did not answer within {timeout_s:.0f} s; give every node the "
                             "same PARITY_RDZV_SECRET, or none (node 0 then writes one to OUT/.nodes/secret)")
        pause(POLL_S)
    channel.run = go["run"]
    return go["refusal"]


def _follow_launches(nodes: Nodes, group: _Group, out: Path) -> int:
    """Run this node's part of each launch node 0 announces, until it says the run is done."""
    k = 0
    while True:
        k += 1
        while (doc := group.channel.read(f"parity/run/launch/{k}", check_launch)) is None:
            pause(POLL_S)
        if "done" in doc:
            group.channel.post(f"parity/bye/{nodes.rank}", {"forged": group.channel.report()})
            return doc["done"]
        result = _run_part(nodes, group, doc, out, fresh=k == 1)
        group.post_result(doc["name"], result)
        print(f"parity: {nodes.where()}: {doc['name']}: {result.status} ({result.wall_s:.1f} s)"
              + (f"\n{result.message}" if result.status != "ok" else ""), flush=True)


def plan_of(doc: dict, out: Path, count: int) -> tuple[Path, int, Path]:
    """The announced plan file, its ranks per node and its progress file, if the plan lies in this node's
    --out, hashes to what node 0 announced and splits over `count` nodes; else Refused."""
    path = Path(doc["plan"]).resolve()
    if not Path(doc["plan"]).is_absolute() or not path.is_relative_to(Path(out).resolve()):
        raise Refused(f"plan {shown(doc['plan'])} is not inside this node's --out {Path(out).resolve()}")
    try:
        data = files.read_bytes(path, MAX_PLAN_BYTES)  # a FIFO swapped in on the shared filesystem cannot hang us
    except OSError as e:
        raise Refused(f"plan {path}: cannot read it ({e.strerror})") from None
    if sha256(data) != doc["sha256"]:
        raise Refused(f"plan {path}: its bytes do not hash to what node 0 announced (changed on the shared filesystem?)")
    try:
        plan = json.loads(data)  # the bytes node 0 wrote, still checked
    except (ValueError, RecursionError):
        plan = None
    world, progress = (plan.get("world_size"), plan.get("progress")) if isinstance(plan, dict) else (None, None)
    if not (isinstance(world, int) and not isinstance(world, bool) and world > 0 and world % count == 0):
        raise Refused(f"plan {path}: world size {shown(world)} does not split over {count} nodes")
    if not isinstance(progress, str):
        raise Refused(f"plan {path}: progress {shown(progress)} is not a path")
    return path, world // count, Path(progress)


def _run_part(nodes: Nodes, group: _Group, doc: dict, out: Path, fresh: bool) -> LaunchResult:
    """This node's torchrun for one launch. `fresh`: the run's first, which clears this node's older logs
    (node 0 has prepared --out by now; the logs are this node's own, so no other node's are touched)."""
    try:
        plan, nproc, progress = plan_of(doc, out, nodes.count)
    except Refused as e:
        return LaunchResult("failed", None, f"node {nodes.rank} refused to run {doc['name']}: {e}", 0.0)
    logs = inside(out, NODE_LOGS, f"node{nodes.rank}")
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log") if fresh else ():
        old.unlink()
    argv = torchrun_argv(nproc, plan, nodes.rendezvous(doc["name"], doc["timeout_s"]))
    return run_process(argv, process_env(), inside(logs, f"{doc['name']}.log"), doc["timeout_s"], progress,
                       label=f"torchrun on node {nodes.rank}", abort=group.failure_elsewhere(doc["name"]),
                       clear_progress=False)
