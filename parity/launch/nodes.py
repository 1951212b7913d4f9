"""One run across nodes: `parity run CASES --nnodes N --node-rank R --rdzv-endpoint HOST:PORT` on each node.

Node 0 plans, launches, judges and reports, as on one node. Its `parity` hosts a TCPStore at
HOST:PORT for the whole run, listening on that address only, and every torchrun (on every node)
uses it for its c10d rendezvous: torchrun finds the port taken and joins as a client, each launch
under its own rendezvous id. The same store carries parity's own messages, so there is one port to
open and nothing stale to mistake for this run (the store lives and dies with node 0's process):

    parity/hello/R     node R's digest of its arguments (cases and their files, steps, device, plan)
    parity/go/R        node 0's answer: "" to go on, or why not (the digests differ)
    parity/launch/K    node 0's K-th launch: its name, plan file, ranks per node and timeout; or {"done": code}
    parity/result/L/R  how launch L ended on node R (each node stops its part when another's failed)
    parity/bye/R       node R read "done" (or a refusal); node 0 may close the store

The other nodes start nothing of their own: for each launch they run torchrun with the plan file
node 0 wrote, so the run directory and the seed checkpoints must be on a filesystem every node
shares. Their torchrun logs go to OUT/.nodes/nodeR/ (a name no case can have). No file lock is
taken across nodes: only node 0 writes anything but those logs.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from parity.errors import InputError
from parity.launch.process import LaunchResult, process_env, run_process
from parity.launch.torchrun import torchrun_argv
from parity.paths import inside

POLL_S = 0.5
BYE_WAIT_S = 60.0  # how long node 0 keeps the store open for the others to read "done"
PEER_RESULT_WAIT_S = 20.0  # after a failed launch, how long node 0 waits to name what the others saw
NODE_LOGS = ".nodes"


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
            if s.trainer != "builtin":
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


class _Group:
    """The messages every node sends and reads."""

    def __init__(self, nodes: Nodes, store):
        self.nodes, self.store = nodes, store

    def post_result(self, name: str, result: LaunchResult) -> None:
        self.store.set(f"parity/result/{name}/{self.nodes.rank}",
                       json.dumps({"status": result.status, "message": result.message[-4000:]}))

    def result(self, name: str, rank: int) -> dict | None:
        key = f"parity/result/{name}/{rank}"
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def failure_elsewhere(self, name: str):
        """For run_process's `abort`: the first other node whose part of the launch failed, as a message."""
        def check() -> str | None:
            for r in range(self.nodes.count):
                if r != self.nodes.rank and (res := self.result(name, r)) and res["status"] != "ok":
                    return f"stopped: node {r}'s part of {name} ended first ({res['status']})"
            return None
        return check


class Leader(_Group):
    """Node 0: hosts the store, waits for every node to agree, announces each launch."""

    def __init__(self, nodes: Nodes, agreed: str, timeout_s: float):
        super().__init__(nodes, _store(nodes, serve=True, timeout_s=timeout_s))
        self.announced = 0
        hellos = [f"parity/hello/{r}" for r in range(1, nodes.count)]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(hellos):
            if time.monotonic() > deadline:
                missing = [r for r in range(1, nodes.count) if not self.store.check([f"parity/hello/{r}"])]
                raise InputError(f"--nnodes {nodes.count}: node(s) {', '.join(map(str, missing))} did not join "
                                 f"within {timeout_s:.0f} s; start `parity run ... --node-rank R --rdzv-endpoint "
                                 f"{nodes.endpoint}` on every node")
            time.sleep(POLL_S)
        differ = [r for r in range(1, nodes.count) if self.store.get(f"parity/hello/{r}").decode() != agreed]
        for r in range(1, nodes.count):
            self.store.set(f"parity/go/{r}", "" if not differ else
                           f"node(s) {', '.join(map(str, differ))} were given other cases, case files or options "
                           "(--steps, --device, --repeat, --plan) than node 0")
        if differ:
            self._wait_for_byes()  # the store must outlive their reading of the refusal
            raise InputError(self.store.get(f"parity/go/{differ[0]}").decode())

    def announce(self, name: str, plan_path: Path, world_size: int, timeout_s: float, progress: Path) -> None:
        self.announced += 1
        self.store.set(f"parity/launch/{self.announced}", json.dumps({
            "name": name, "plan": str(plan_path), "nproc": self.nodes.ranks_per_node(world_size),
            "timeout_s": timeout_s, "progress": str(progress)}))

    def others_said(self, name: str) -> str:
        """What the other nodes reported of a failed launch, waiting a little for the slower ones."""
        deadline = time.monotonic() + PEER_RESULT_WAIT_S
        said = {}
        while len(said) < self.nodes.count - 1 and time.monotonic() < deadline:
            said = {r: res for r in range(1, self.nodes.count) if (res := self.result(name, r)) is not None}
            time.sleep(POLL_S)
        return "\n".join(f"node {r}: {res['status']}: {res['message']}" if r in said
                         else f"node {r}: no report within {PEER_RESULT_WAIT_S:.0f} s (its parity may be gone)"
                         for r in range(1, self.nodes.count) for res in [said.get(r)])

    def finish(self, code: int) -> None:
        """Tell every node the run is over (with the exit code they should give), then wait for them to read it."""
        self.announced += 1
        self.store.set(f"parity/launch/{self.announced}", json.dumps({"done": code}))
        self._wait_for_byes()

    def _wait_for_byes(self) -> None:
        byes = [f"parity/bye/{r}" for r in range(1, self.nodes.count)]
        deadline = time.monotonic() + BYE_WAIT_S
        while not self.store.check(byes) and time.monotonic() < deadline:
            time.sleep(POLL_S)


def follow(nodes: Nodes, agreed: str, out: Path, timeout_s: float) -> int:
    """Node R > 0: join node 0, run torchrun for each launch it announces, and return its exit code."""
    group = _Group(nodes, _store(nodes, serve=False, timeout_s=timeout_s))
    store = group.store
    store.set(f"parity/hello/{nodes.rank}", agreed)
    refusal = store.get(f"parity/go/{nodes.rank}").decode()  # blocks until node 0 has heard every node
    if refusal:
        store.set(f"parity/bye/{nodes.rank}", "")
        raise InputError(refusal)
    print(f"parity: {nodes.where()}: following node 0", flush=True)
    k = 0
    try:
        while True:
            k += 1
            key = f"parity/launch/{k}"
            while not store.check([key]):
                time.sleep(POLL_S)
            doc = json.loads(store.get(key))
            if "done" in doc:
                store.set(f"parity/bye/{nodes.rank}", "")
                return int(doc["done"])
            result = _run_part(nodes, group, doc, out, fresh=k == 1)
            group.post_result(doc["name"], result)
            print(f"parity: {nodes.where()}: {doc['name']}: {result.status} ({result.wall_s:.1f} s)"
                  + (f"\n{result.message}" if result.status != "ok" else ""), flush=True)
    except RuntimeError as e:  # the store's connection: node 0's parity is gone
        print(f"parity: {nodes.where()}: lost node 0 ({str(e).splitlines()[0]}); exiting", file=sys.stderr)
        return 1


def _run_part(nodes: Nodes, group: _Group, doc: dict, out: Path, fresh: bool) -> LaunchResult:
    """This node's torchrun for one launch. `fresh`: the run's first, which clears this node's older logs
    (node 0 has prepared --out by now; the logs are this node's own, so no other node's are touched)."""
    logs = inside(out, NODE_LOGS, f"node{nodes.rank}")
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log") if fresh else ():
        old.unlink()
    argv = torchrun_argv(doc["nproc"], Path(doc["plan"]), nodes.rendezvous(doc["name"], doc["timeout_s"]))
    return run_process(argv, process_env(), inside(logs, f"{doc['name']}.log"), doc["timeout_s"],
                       Path(doc["progress"]), label=f"torchrun on node {nodes.rank}",
                       abort=group.failure_elsewhere(doc["name"]), clear_progress=False)
