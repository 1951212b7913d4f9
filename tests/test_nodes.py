"""Runs across nodes, proven on one machine: two `parity run --nnodes 2` processes on localhost, each
starting a torchrun of its share of the ranks (world size / nodes) that meet in a c10d rendezvous
hosted by node 0's parity. The runs are as small as their claims allow: the tiny model, 2 steps,
2 nodes of 2 ranks for the bit-identity (ranks meet beside them on their node and across), 1 rank
a node for the kill; one SLURM job, with a forger on its port, serves the script, job and
bit-identity tests."""

import json
import math
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from parity.core import records
from parity.core.rundir import foreign_entries
from parity.core.errors import InputError
from parity.run.launch import nodes
from parity.run.launch.channel import (MAX_NOTES, SECRET_ENV, Channel, Refused, env_secret, is_report, read_secret, shown,
                                   sign, verify, write_secret)
from parity.run.launch.nodes import check_go, check_launch, plan_of
from parity.core.lifeline import alive, descendants
from test_launch import parity_ranks
from test_plan import record_bytes

CASE = """
description = "two layouts of {world} ranks, for runs across nodes"
[train]
model = "tiny"
steps = {steps}
global_batch = {world}
seq_len = 16
[setups.replicate]
dp_api = "replicate"
dp_replicate = {world}
[setups.hsdp]
dp_api = "fully_shard"
dp_replicate = {world}
dp_shard = 1
{extra}
"""
HANG = '[setups.faulty]\ndp_api = "replicate"\ndp_replicate = {world}\nfault = "hang"\n'


def case_text(world: int, steps: int, hang: bool = False) -> str:
    """The case above at `world` ranks (a batch row per rank); `hang` adds a setup whose rank 1 hangs at step 2."""
    return CASE.format(world=world, steps=steps, extra=HANG.format(world=world) if hang else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def parity_run(case: Path, out: Path, cache: Path, *extra: str, node: int | None = None,
               port: int | None = None, log: Path | None = None, nnodes: int = 2) -> subprocess.Popen:
    argv = [sys.executable, "-m", "parity.cli", "run", str(case), "--device", "cpu", "--out", str(out),
            "--baselines", str(case.parent / "baselines"), "--no-report", *extra]
    if node is not None:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node), "--rdzv-endpoint", f"localhost:{port}"]
    with open(log or out.parent / f"{out.name}-node{node}.log", "w") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PARITY_CACHE=str(cache)))


def two_nodes(case: Path, out: Path, cache: Path, *extra: str, port: int | None = None
              ) -> tuple[subprocess.Popen, subprocess.Popen]:
    port = port or free_port()
    follower = parity_run(case, out, cache, *extra, node=1, port=port)  # either may start first
    leader = parity_run(case, out, cache, *extra, node=0, port=port)
    return leader, follower


def log_of(out: Path, node: int) -> str:
    return (out.parent / f"{out.name}-node{node}.log").read_text()


def leave_nothing(scope: Path) -> None:
    """No torchrun or rank of the runs under `scope` is left. A failed test's own processes are killed
    either way, so they cannot slow down or collide with the tests after it."""
    deadline = time.monotonic() + 10
    while parity_ranks(scope) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = parity_ranks(scope)
    for pid in left + _parity_clis(scope):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == [], "processes left behind"


@pytest.fixture
def no_stray_processes(tmp_path):
    yield
    leave_nothing(tmp_path)


def _parity_clis(scope: Path) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"parity.cli" in cmd and str(scope).encode() in cmd:
            pids.append(int(entry))
    return pids


class Forger(threading.Thread):
    """Someone on the rendezvous port without the secret: lists the store's keys as any client can and
    keeps overwriting parity's messages (hellos, answers, launches, results) with forged ones in the
    old, unsigned format, plants them under keys not yet written, copies a genuine launch message to
    the next launch's key, and notes where the store listens. It leaves alone only the claims and the
    byes: a bye, the last message of a run, cannot be put back once its writer has exited (a forged
    one keeps node 0 waiting BYE_WAIT_S, then it exits as it would have)."""

    PLANTED = {"parity/run/launch/1": {"name": "launch1", "plan": "/tmp/evil.json", "nproc": 64, "timeout_s": 1,
                                   "progress": "/tmp/p"},
               "parity/run/launch/2": {"done": 3}, "parity/run/launch/3": {"done": 3},  # a node that obeyed would exit 3
               "parity/result/launch1/0": {"status": "failed", "message": "forged"},
               "parity/result/launch1/1": {"status": "failed", "message": "forged"}}

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.listening = port, threading.Event(), None

    def run(self):
        from torch.distributed import TCPStore

        while not self.stop.is_set():
            try:
                store = TCPStore("localhost", self.port, is_master=False, timeout=timedelta(seconds=5))
                break
            except RuntimeError:  # node 0 is not up yet
                time.sleep(0.2)
        else:
            return
        self.listening = listening(self.port)
        genuine, turn = None, 0
        try:
            while not self.stop.is_set():
                found = [k for k in store.list_keys() if k.startswith("parity/")
                         and not k.startswith(("parity/claim/", "parity/bye/"))]
                if "parity/run/launch/1" in found and b'"mac"' in (value := store.get("parity/run/launch/1")):
                    genuine = value  # node 0's first launch message, signed
                for key in sorted(set(found) | set(self.PLANTED)):
                    store.set(key, json.dumps(self.PLANTED.get(key, {"done": 3})))
                turn += 1
                if genuine and turn % 2:
                    store.set("parity/run/launch/2", genuine)  # replayed where node 1 looks for the next launch
                time.sleep(0.5)
        except RuntimeError:  # node 0 has gone: the run is over
            pass


@pytest.mark.slow
def test_killing_one_nodes_agent_fails_the_run_on_both_and_leaves_nothing(write_case, tmp_path, seed_cache,
                                                                          no_stray_processes):
    """Rank 1 hangs at step 2 of `faulty`; node 1's torchrun is then SIGKILLed. Node 0 must stop its own part
    at once (not after --timeout), name what node 1 saw, and both parity processes exit 1. One rank per
    node: the kill and what node 0 makes of it need no more, and world size 2 over 2 nodes is the split
    where ranks per node (1) and nodes (2) differ."""
    case = write_case(case_text(world=2, steps=2, hang=True))
    out = tmp_path / "out"
    leader, follower = two_nodes(case, out, seed_cache, "--timeout", "300")
    hung = out / "case" / "faulty" / "rank1.log"
    deadline = time.monotonic() + 240
    while not (hung.is_file() and "planted fault: rank 1 hangs" in hung.read_text()):
        if time.monotonic() > deadline or leader.poll() is not None:  # a run that failed first fails at once
            pytest.fail(f"rank 1 never reached its planted hang\n{log_of(out, 0)}")
        time.sleep(0.2)
    # torchrun itself (`python -m torch.distributed.run ...`), not the supervisor whose argv holds it
    agent = [p for p in descendants(follower.pid)
             if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"torch.distributed.run"]]
    assert len(agent) == 1
    everything = descendants(leader.pid) + descendants(follower.pid)
    os.kill(agent[0], signal.SIGKILL)
    killed = time.monotonic()
    assert leader.wait(timeout=120) == 1, log_of(out, 0)
    assert time.monotonic() - killed < 60  # stopped by node 1's report, not by the 300 s timeout
    assert follower.wait(timeout=60) == 1, log_of(out, 1)  # node 0's exit code
    faulty = records.read_json(out / "case" / "faulty" / "run.json")
    assert faulty["status"] == "failed"
    assert "stopped: node 1's part of launch1 ended first (failed)" in faulty["message"]
    assert "node 1: failed: torchrun on node 1 exited with code -9" in faulty["message"]
    assert "planted fault: rank 1 hangs at step 2" in faulty["message"]  # the tails of the setup it stopped in
    assert records.read_json(out / "case" / "replicate" / "run.json")["status"] == "ok"  # before the fault: kept
    assert not [p for p in everything if alive(p)]
    # The run's secret ends with the run, failed or not (node 0 wrote it: none was in the environment).
    assert not (out / ".nodes" / "secret").exists()


@dataclass(frozen=True)
class SlurmRun:
    root: Path  # case.toml, baselines/, one/ (the single launch), out/ (the job's run), task0.log and task1.log
    case: Path
    argv: list[str]  # the command that printed the job script
    script: str
    job: subprocess.CompletedProcess
    forger: Forger


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, seed_cache):
    """One launch of 4 ranks, writing the baselines; then the SLURM job script for the same case, run under
    stand-ins for scontrol, srun and hostname that play a 2-node allocation on localhost (srun starts one
    task per node with SLURM_NODEID), with a forger on the rendezvous port all along: 2 nodes of 2 ranks.
    The tests below read the script, the job and the bit-identity off these two runs."""
    root = tmp_path_factory.mktemp("slurm")
    case = root / "case.toml"
    case.write_text(case_text(world=4, steps=2))  # 2 steps: the second starts from the first's optimizer state
    try:
        one = parity_run(case, root / "one", seed_cache, "--update-baselines=new", log=root / "one.log")
        assert one.wait(timeout=300) == 0, (root / "one.log").read_text()
        argv = [sys.executable, "-m", "parity.cli", "run", str(case), "--device", "cpu", "--out", str(root / "out"),
                "--baselines", str(root / "baselines"), "--update-baselines=new", "--launcher", "slurm", "--nnodes", "2"]
        script = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=root).stdout
        port = free_port()
        forger = Forger(port)
        forger.start()
        try:
            env = dict(os.environ, PATH=f"{slurm_stand_ins(root / 'bin')}:{os.environ['PATH']}",
                       SLURM_JOB_NODELIST="localhost", PARITY_RDZV_PORT=str(port), PARITY_CACHE=str(seed_cache),
                       SRUN_LOGS=str(root))
            job = subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=300)
        finally:
            forger.stop.set()
            forger.join(timeout=30)
        yield SlurmRun(root, case, argv, script, job, forger)
    finally:
        leave_nothing(root)


def slurm_stand_ins(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": 'echo localhost',
        "hostname": 'echo 127.0.0.1',
        "srun": '\n'.join([
            'if [ "$1" = "--nodes=1" ]; then shift 4; exec "$@"; fi  # srun --nodes=1 --ntasks=1 -w HOST CMD',
            'shift  # --kill-on-bad-exit=1',
            '[ "${#PARITY_RDZV_SECRET}" -eq 64 ] && echo yes > "$SRUN_LOGS/secret-passed"  # the job made one',
            'pids=(); for i in 0 1; do SLURM_NODEID=$i "$@" > "$SRUN_LOGS/task$i.log" 2>&1 & pids+=($!); done',
            'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc']),
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


@pytest.mark.slow
def test_slurm_job_script_asks_for_one_parity_per_node(slurm_run):
    script, root = slurm_run.script, slurm_run.root
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "--gpus-per-node" not in script  # a CPU run asks for no GPUs
    assert f"#SBATCH --chdir={root}" in script
    assert "--node-rank \"$SLURM_NODEID\"" in script and "--nnodes 2" in script and str(slurm_run.case) in script
    # One secret per job, made by the batch script unless the submitter set one; srun passes it to every node.
    assert 'if [ -z "${PARITY_RDZV_SECRET:-}" ]; then PARITY_RDZV_SECRET=$(' in script
    assert "secrets.token_hex(32)" in script and "export PARITY_RDZV_SECRET" in script
    argv = slurm_run.argv
    gpu_argv = [*argv[:6], "cuda", *argv[7:-1], "4"]  # --nnodes 4: ranks per node (1) and nodes (4) differ
    gpu_script = subprocess.run(gpu_argv, capture_output=True, text=True, check=True).stdout
    assert "#SBATCH --nodes=4" in gpu_script and "#SBATCH --gpus-per-node=1" in gpu_script  # 4 ranks over 4 nodes


@pytest.mark.slow
def test_slurm_job_script_runs_one_parity_per_node(slurm_run):
    root, job = slurm_run.root, slurm_run.job
    logs = "\n".join((root / f"task{i}.log").read_text() for i in (0, 1))
    assert job.returncode == 0, logs + job.stderr
    assert "case: PASS" in (root / "task0.log").read_text()  # node 0 judged
    assert "launch1: ok" in (root / "task1.log").read_text()  # node 1 followed
    assert (root / "secret-passed").read_text() == "yes\n"  # srun handed the job's secret to the nodes
    assert records.read_json(root / "out" / "case" / "replicate" / "run.json")["world_size"] == 4


@pytest.mark.slow
def test_two_nodes_of_two_ranks_match_one_launch_of_four_bitwise(slurm_run):
    """The job's 2-node run is bit-identical to the one launch of 4 ranks, with a forger on the rendezvous
    port all along: no forged launch, plan, rank count, result or "done" is acted on, and node 0 names them."""
    root, two = slurm_run.root, slurm_run.root / "out"
    assert slurm_run.job.returncode == 0, (root / "task0.log").read_text() + (root / "task1.log").read_text()
    assert slurm_run.forger.listening == ["127.0.0.1"]  # the store's socket: the endpoint's address only
    said = (root / "task0.log").read_text()
    # Node 0 names what it refused and put back, and what node 1 refused: forged results on both sides
    # (each node polls the other's while its own part runs, and the forger planted them first), and the
    # forged launch (64 ranks, another plan) it put back; both nodes ran 2 ranks (the rank logs below).
    # Whether node 1 reads a planted "done" or a forged launch before node 0's genuine one is a matter
    # of timing here; test_a_forged_done_is_refused_and_named_by_node_0 pins that down.
    for line in ["parity: node 0: refused parity/result/launch1/1 (malformed: not a signed parity message): "
                 """b'{"status": "failed", "message": "forged"}'""",
                 "parity: node 0: put back parity/run/launch/1, found overwritten with b'{\"name\": \"launch1\", "
                 "\"plan\": \"/tmp/evil.json\", \"nproc\": 64",
                 "parity: node 0: node 1 refused parity/result/launch1/0 (malformed: not a signed parity message)"]:
        assert line in said, said
    for setup in ("replicate", "hsdp"):
        assert record_bytes(two, "case", setup) == record_bytes(root / "one", "case", setup), setup
        run = records.read_json(two / "case" / setup / "run.json")
        assert run["world_size"] == 4 and "--nnodes" in run["command"]
        assert sorted(p.name for p in (two / "case" / setup).glob("rank*.log")) == \
            sorted(f"rank{r}.log" for r in range(4))  # every rank of both nodes logs into the shared run directory
        # node 0 judged against the baselines the single launch wrote (it writes only missing ones)
        assert f"baseline {setup} [cpu, exact]: match: matches {root / 'baselines'}" in said, said
    assert (two / ".nodes" / "node1" / "launch1.log").is_file()  # node 1's torchrun log
    assert foreign_entries(two) == []  # a next run may use the same --out


def test_slurm_submit_writes_the_script_and_calls_sbatch(write_case, tmp_path):
    """--submit, against a stand-in sbatch that echoes what it was given (no test submits to a real cluster)."""
    case = write_case(case_text(world=8, steps=2))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "Submitted batch job 42 ($*)"\n')
    (bin_dir / "sbatch").chmod(stat.S_IRWXU)
    argv = [sys.executable, "-m", "parity.cli", "run", str(case), "--out", str(tmp_path / "out"),
            "--launcher", "slurm", "--nnodes", "2", "--submit"]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"Submitted batch job 42 ({tmp_path / 'out' / 'slurm-job.sh'})" in done.stdout
    assert "#SBATCH --nodes=2" in (tmp_path / "out" / "slurm-job.sh").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--nnodes", "2"], "--nnodes 2 needs --node-rank"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2: allowed: 0 to 1"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h"], "allowed: HOST:PORT"),
    (["--nnodes", "3", "--node-rank", "0", "--rdzv-endpoint", "h:1"], "world size 8 does not split evenly over --nnodes 3"),
    (["--node-rank", "1"], "need --nnodes 2 or more"),
    (["--submit"], "--submit: allowed only with --launcher slurm"),
    (["--launcher", "slurm", "--nnodes", "2", "--node-rank", "0"], "the job script sets --node-rank"),
])
def test_bad_node_arguments_are_one_line_and_exit_2(write_case, tmp_path, extra, message):
    case = write_case(case_text(world=8, steps=2))
    done = subprocess.run([sys.executable, "-m", "parity.cli", "run", str(case), "--device", "cpu",
                           "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_node_given_other_cases_or_a_taken_rank_is_refused(write_case, tmp_path, seed_cache, no_stray_processes):
    """Three nodes (world size 6): a second node claiming --node-rank 1 is refused at once, one line and
    exit 2; then node 1's other case is refused on every node before anything is written."""
    from torch.distributed import TCPStore

    port = free_port()
    case = write_case(case_text(world=6, steps=2))
    other = write_case(case_text(world=6, steps=3), name="other")
    out = tmp_path / "out"
    follower = parity_run(other, out, seed_cache, node=1, port=port, nnodes=3)
    leader = parity_run(case, out, seed_cache, node=0, port=port, nnodes=3)
    watcher = None
    deadline = time.monotonic() + 120
    while watcher is None or not watcher.check(["parity/claim/1"]):  # node 1 has joined
        assert time.monotonic() < deadline, log_of(out, 0)
        try:
            watcher = watcher or TCPStore("localhost", port, is_master=False, timeout=timedelta(seconds=5))
        except RuntimeError:
            pass
        time.sleep(0.2)
    second = parity_run(case, out, seed_cache, node=1, port=port, nnodes=3, log=tmp_path / "second.log")
    assert second.wait(timeout=60) == 2
    assert (tmp_path / "second.log").read_text().strip() == ("parity: error: --node-rank 1: another node already "
                                                             "joined as --node-rank 1; allowed: a rank from 1 to 2 "
                                                             "that no other node of this run has")
    third = parity_run(case, out, seed_cache, node=2, port=port, nnodes=3)
    assert leader.wait(timeout=120) == 2 and follower.wait(timeout=60) == 2 and third.wait(timeout=60) == 2
    for node in (0, 1, 2):
        assert "node(s) 1 were given other cases, case files or options" in log_of(out, node)
    assert "parity: node 0: another node also tried to join as --node-rank 1; it was refused" in log_of(out, 0)
    assert not out.exists()  # refused before anything was written (node 0's secret file is gone with its folders)


# The message layer, fast: real TCPStores in this process, no torchrun.

SECRET = b"s" * 32
RUN, OLD_RUN = "a" * 32, "b" * 32


@pytest.fixture
def store():
    """A store, and a second client on it without the secret: anyone who reaches the port."""
    from torch.distributed import TCPStore

    served = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    attacker = TCPStore("127.0.0.1", served.port, is_master=False, timeout=timedelta(seconds=10))
    yield served, attacker


def test_a_signed_message_verifies_only_at_its_key_in_its_run():
    raw = sign(SECRET, "parity/run/launch/1", RUN, {"done": 0})
    assert verify(SECRET, "parity/run/launch/1", raw, RUN) == {"done": 0}
    outer = json.loads(raw)
    tampered = json.dumps({**outer, "msg": outer["msg"].replace('"done": 0', '"done": 1')}).encode()
    for key, value, run, reason in [
            ("parity/run/launch/1", tampered, RUN, "bad signature"),
            ("parity/run/launch/1", sign(b"x" * 32, "parity/run/launch/1", RUN, {"done": 0}), RUN, "bad signature"),
            ("parity/run/launch/2", raw, RUN, "wrong key binding: signed for 'parity/run/launch/1'"),  # copied to another key
            ("parity/run/launch/1", raw, OLD_RUN, f"wrong run: signed for run '{RUN}'"),  # replayed into another run
            ("parity/run/launch/1", b'{"done": 0}', RUN, "malformed: not a signed parity message"),
            ("parity/run/launch/1", b"\xff" * 10, RUN, "malformed"),
            ("parity/run/launch/1", b"[" * 60000, RUN, "malformed: not a signed parity message"),  # deeper than Python's stack
            ("parity/run/launch/1", b" " * (70 * 1024), RUN, "malformed: 71680 bytes")]:
        with pytest.raises(Refused) as refused:
            verify(SECRET, key, value, run)
        assert str(refused.value).startswith(reason), (reason, str(refused.value))


def test_an_old_runs_go_message_is_refused_by_a_new_hello(store):
    """The operator's secret is reused, so an old run's signed go verifies; it answers another nonce."""
    served, attacker = store
    old_nonce, nonce = secrets.token_hex(16), secrets.token_hex(16)
    attacker.set("parity/go/1", sign(SECRET, "parity/go/1", "", {"nonce": old_nonce, "run": OLD_RUN, "refusal": ""}))
    follower = Channel(served, SECRET, 1)
    assert follower.read("parity/go/1", check_go(nonce), run="") is None
    assert follower.report() == [f"refused parity/go/1 (wrong run: it answers another hello (replayed from an older "
                                 f"run?)): {shown(attacker.get('parity/go/1'))}"]
    Channel(served, SECRET, 0, RUN).post("parity/go/1", {"nonce": nonce, "run": RUN, "refusal": ""}, run="")
    assert follower.read("parity/go/1", check_go(nonce), run="") == {"nonce": nonce, "run": RUN, "refusal": ""}


def test_forged_messages_are_named_skipped_and_overwritten_ones_put_back(store, capsys):
    served, attacker = store
    leader, follower = Channel(served, SECRET, 0, RUN), Channel(served, SECRET, 1, RUN)
    leader.post("parity/run/launch/1", {"name": "launch1", "plan": "/x/launch1.json", "sha256": "0" * 64, "timeout_s": 9})
    genuine = attacker.get("parity/run/launch/1")
    attacker.set("parity/run/launch/2", genuine)  # a genuine message copied to the next launch's key
    assert follower.read("parity/run/launch/2", check_launch) is None
    attacker.set("parity/run/launch/1", json.dumps({"done": 0}))  # a forged "done", in the old format
    assert follower.read("parity/run/launch/1", check_launch) is None
    leader._kept = 0.0  # its next poll checks its own messages now
    leader.keep_posted()
    assert follower.read("parity/run/launch/1", check_launch)["name"] == "launch1"
    attacker.delete_key("parity/run/launch/1")
    leader._kept = 0.0
    leader.keep_posted()
    assert attacker.get("parity/run/launch/1") == genuine
    assert follower.report() == [
        "refused parity/run/launch/2 (wrong key binding: signed for 'parity/run/launch/1'): " + shown(genuine),
        "refused parity/run/launch/1 (malformed: not a signed parity message): " + shown(b'{"done": 0}')]
    assert leader.report() == ["put back parity/run/launch/1, found overwritten with " + shown(b'{"done": 0}')]
    err = capsys.readouterr().err  # each named once, as it happened
    assert "parity: node 1: refused parity/run/launch/2 (wrong key binding" in err
    assert "parity: node 0: put back parity/run/launch/1" in err


def test_what_a_node_names_is_bounded_and_escaped(store, capsys):
    served, attacker = store
    follower = Channel(served, SECRET, 1, RUN)
    for k in range(MAX_NOTES + 5):
        attacker.set(f"parity/run/launch/{k}", "\x1b[2J" + "x" * 500)  # a terminal escape, and long
        attacker.set(f"parity/run/launch/{k}", "\x1b[2J" + "y" * 500)  # the same key and reason again: named once
        assert follower.read(f"parity/run/launch/{k}", check_launch) is None
        follower.read(f"parity/run/launch/{k}", check_launch)
    report = follower.report()
    assert len(report) == MAX_NOTES + 1 and report[-1] == "refused or put back 5 more message(s), not listed"
    assert is_report(report) and all("\x1b" not in line and len(line) < 250 for line in report)
    assert len(capsys.readouterr().err.splitlines()) == MAX_NOTES


@pytest.mark.slow
def test_a_forged_done_is_refused_and_named_by_node_0(tmp_path, capsys):
    """Node 0 and node 1 (threads here, on a real store, with no launch between them): a "done" forged
    before node 0 sends its own, in the old format and then with a made-up MAC, is refused by node 1,
    which exits with node 0's code; node 0 names both."""
    from torch.distributed import TCPStore

    port, agreed, said = free_port(), "d" * 64, []
    leader, code = [], []
    lead = threading.Thread(target=lambda: leader.append(
        nodes.Leader(nodes.parse_nodes(2, 0, f"localhost:{port}"), agreed, tmp_path, 30, SECRET)))
    lead.start()
    follow = threading.Thread(target=lambda: code.append(
        nodes.follow(nodes.parse_nodes(2, 1, f"localhost:{port}"), agreed, tmp_path, 30, SECRET)))
    follow.start()
    lead.join(timeout=60)
    attacker = TCPStore("localhost", port, is_master=False, timeout=timedelta(seconds=10))
    forged = [b'{"done": 3}', json.dumps({"msg": json.dumps({"key": "parity/run/launch/1", "run": leader[0].channel.run,
                                                             "body": {"done": 3}}), "mac": "0" * 64}).encode()]
    for value, reason in zip(forged, ["malformed: not a signed parity message", "bad signature"]):
        attacker.set("parity/run/launch/1", value)
        deadline = time.monotonic() + 30
        while f"refused parity/run/launch/1 ({reason})" not in "".join(said):
            assert time.monotonic() < deadline, "".join(said)
            said.append(capsys.readouterr().err)
            time.sleep(0.1)
    leader[0].finish(0)
    follow.join(timeout=30)
    said.append(capsys.readouterr().err)
    assert code == [0]
    for value, reason in zip(forged, ["malformed: not a signed parity message", "bad signature"]):
        assert f"parity: node 0: node 1 refused parity/run/launch/1 ({reason}): {shown(value)}" in "".join(said)


def test_launch_messages_are_checked_field_by_field():
    good = {"name": "launch1", "plan": "/o/launch1.json", "sha256": "0" * 64, "timeout_s": 900.0}
    check_launch(good)
    check_launch({"done": 1})
    for bad in [{**good, "nproc": 64}, {**good, "timeout_s": math.nan}, {**good, "timeout_s": math.inf},
                {**good, "timeout_s": -1}, {**good, "timeout_s": True}, {**good, "timeout_s": "9"},
                {**good, "name": "../x"}, {**good, "sha256": "0" * 63}, {**good, "plan": 7},
                {"done": "0"}, {"done": 300}, {"done": True}, {"done": 0, "name": "launch1"}]:
        with pytest.raises(Refused, match="malformed"):
            check_launch(bad)


def test_a_follower_runs_only_the_announced_plan_from_its_own_out(tmp_path):
    out = tmp_path / "out"
    (out / ".launch-x").mkdir(parents=True)
    plan = out / ".launch-x" / "launch1.json"
    plan.write_text(json.dumps({"world_size": 8, "progress": str(out / "p")}))
    doc = {"name": "launch1", "plan": str(plan), "sha256": nodes.sha256(plan.read_bytes()), "timeout_s": 9}
    assert plan_of(doc, out, 2) == (plan, 4, out / "p")  # 8 ranks over 2 nodes: 4 here, whatever a message says
    elsewhere = tmp_path / "evil.json"
    elsewhere.write_bytes(plan.read_bytes())
    (out / "link.json").symlink_to(elsewhere)
    for changed, count, reason in [
            ({"plan": str(elsewhere)}, 2, "is not inside this node's --out"),
            ({"plan": str(out / "link.json")}, 2, "is not inside this node's --out"),
            ({"plan": str(out / ".launch-x" / ".." / ".." / "evil.json")}, 2, "is not inside this node's --out"),
            ({"plan": "launch1.json"}, 2, "is not inside this node's --out"),  # relative: to what?
            ({"sha256": "0" * 64}, 2, "do not hash to what node 0 announced"),
            ({"plan": str(out / "missing.json")}, 2, "cannot read it"),
            ({}, 3, "world size 8 does not split over 3 nodes")]:
        with pytest.raises(Refused, match=reason):
            plan_of({**doc, **changed}, out, count)


@pytest.mark.parametrize("value", ["short", "a" * 20 + " " + "a" * 20, "é" * 40, "a" * 40 + "\x1b[2J", "a" * 1025])
def test_a_bad_secret_in_the_environment_is_named_and_not_echoed(value):
    with pytest.raises(InputError) as bad:
        env_secret({SECRET_ENV: value})
    assert str(bad.value).startswith(f"{SECRET_ENV}: {len(value)} characters, not all allowed; allowed: 32 to 1024")
    assert value not in str(bad.value)
    assert env_secret({SECRET_ENV: "k" * 32}) == b"k" * 32 and env_secret({}) is None


def test_a_secret_file_is_read_only_if_it_is_ours_private_and_well_formed(tmp_path):
    path = tmp_path / "secret"
    secret = write_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_secret(path) == secret and len(secret) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temporary file left
    link = tmp_path / "link"
    link.symlink_to(path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InputError, match="cannot read the run's secret"):
        read_secret(link)
    with pytest.raises(InputError, match="is not a regular file"):
        read_secret(fifo)
    with pytest.raises(InputError, match="cannot read the run's secret .No such file"):
        read_secret(tmp_path / "missing")
    path.chmod(0o640)
    with pytest.raises(InputError, match="has mode 0640"):
        read_secret(path)
    path.chmod(0o600)
    if os.getuid() == 0:  # only root can give the file away; elsewhere the other checks stand
        os.chown(path, 12345, -1)
        with pytest.raises(InputError, match="is owned by uid 12345, not by you"):
            read_secret(path)
        os.chown(path, 0, -1)
    path.write_text("not hex " * 8)
    with pytest.raises(InputError, match="does not hold 64 hex digits"):
        read_secret(path)


def listening(port: int) -> list[str]:
    """The local addresses with a socket listening on `port`, from /proc/net/tcp and tcp6."""
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words, each in the host's byte order
                if sys.byteorder == "little":
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(socket.inet_ntop(family, raw))
    return found


def test_the_store_listens_on_the_endpoint_address_only():
    port = free_port()
    served = nodes._store(nodes.parse_nodes(2, 0, f"localhost:{port}"), serve=True, timeout_s=10)
    assert listening(port) == ["127.0.0.1"]
    with pytest.raises(ConnectionRefusedError):  # 127.0.0.2 is this machine too: a store on every interface answers
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
    with pytest.raises(InputError, match=f"--rdzv-endpoint localhost:{port}: node 0 cannot host the rendezvous there "
                                         r"\(Address already in use\); allowed: a free port"):
        nodes._store(nodes.parse_nodes(2, 0, f"localhost:{port}"), serve=True, timeout_s=10)
    del served
    if socket.has_ipv6 and "::1" in (a[4][0] for a in socket.getaddrinfo("::1", 0)):  # where the host has IPv6
        six = nodes.parse_nodes(2, 0, f"[::1]:{port}")
        served = nodes._store(six, serve=True, timeout_s=10)
        assert listening(port) == ["::1"] and six.rendezvous("l", 9)[2] == f"--rdzv-endpoint=[::1]:{port}"
    with pytest.raises(InputError, match="node 0 cannot resolve 'no-such-host.invalid'"):
        nodes._store(nodes.parse_nodes(2, 0, f"no-such-host.invalid:{port}"), serve=True, timeout_s=10)
