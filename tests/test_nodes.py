"""Runs across nodes, proven on one machine: two `parity run --nnodes 2` processes on localhost, each
starting a torchrun of 4 ranks that meet in a c10d rendezvous hosted by node 0's parity."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity import records
from parity.errors import InputError
from parity.launch import nodes
from parity.launch.process import alive, descendants
from test_launch import parity_ranks
from test_plan import record_bytes

CASE = """
description = "two layouts of 8 ranks, for runs across nodes"
[train]
model = "tiny"
steps = {steps}
global_batch = 8
seq_len = 16
[setups.replicate]
dp_api = "replicate"
dp_replicate = 8
[setups.hsdp]
dp_api = "fully_shard"
dp_replicate = 8
dp_shard = 1
{extra}
"""
HANG = '[setups.faulty]\ndp_api = "replicate"\ndp_replicate = 8\nfault = "hang"\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def parity_run(case: Path, out: Path, cache: Path, *extra: str, node: int | None = None,
               port: int | None = None, log: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "parity.cli", "run", str(case), "--device", "cpu", "--out", str(out),
            "--baselines", str(case.parent / "baselines"), "--no-report", *extra]
    if node is not None:
        argv += ["--nnodes", "2", "--node-rank", str(node), "--rdzv-endpoint", f"localhost:{port}"]
    with open(log or out.parent / f"{out.name}-node{node}.log", "w") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PARITY_CACHE=str(cache)))


def two_nodes(case: Path, out: Path, cache: Path, *extra: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    port = free_port()
    follower = parity_run(case, out, cache, *extra, node=1, port=port)  # either may start first
    leader = parity_run(case, out, cache, *extra, node=0, port=port)
    return leader, follower


def log_of(out: Path, node: int) -> str:
    return (out.parent / f"{out.name}-node{node}.log").read_text()


@pytest.fixture
def no_stray_processes(tmp_path):
    """After the test: no torchrun or rank of it is left. A failed test's own processes are killed
    either way, so they cannot slow down or collide with the tests after it."""
    yield
    deadline = time.monotonic() + 10
    while parity_ranks(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = parity_ranks(tmp_path)
    for pid in left + _parity_clis(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == [], "processes left behind"


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


def test_two_nodes_of_four_ranks_match_one_launch_of_eight_bitwise(write_case, tmp_path, seed_cache,
                                                                    no_stray_processes):
    case = write_case(CASE.format(steps=3, extra=""))
    one = parity_run(case, tmp_path / "one", seed_cache, "--update-baselines=new", log=tmp_path / "one.log")
    assert one.wait(timeout=300) == 0, (tmp_path / "one.log").read_text()
    leader, follower = two_nodes(case, tmp_path / "two", seed_cache)
    assert leader.wait(timeout=300) == 0, log_of(tmp_path / "two", 0)
    assert follower.wait(timeout=60) == 0, log_of(tmp_path / "two", 1)
    for setup in ("replicate", "hsdp"):
        assert record_bytes(tmp_path / "two", "case", setup) == record_bytes(tmp_path / "one", "case", setup), setup
        run = records.read_json(tmp_path / "two" / "case" / setup / "run.json")
        assert run["world_size"] == 8 and "--nnodes" in run["command"]
        assert sorted(p.name for p in (tmp_path / "two" / "case" / setup).glob("rank*.log")) == \
            sorted(f"rank{r}.log" for r in range(8))  # every rank of both nodes logs into the shared run directory
    assert "matches" in log_of(tmp_path / "two", 0)  # node 0 judged against the baselines the 8-rank run wrote
    assert "launch1: ok" in log_of(tmp_path / "two", 1)
    assert (tmp_path / "two" / ".nodes" / "node1" / "launch1.log").is_file()  # node 1's torchrun log


def test_killing_one_nodes_agent_fails_the_run_on_both_and_leaves_nothing(write_case, tmp_path, seed_cache,
                                                                          no_stray_processes):
    """Rank 1 hangs at step 2 of `faulty`; node 1's torchrun is then SIGKILLed. Node 0 must stop its own part
    at once (not after --timeout), name what node 1 saw, and both parity processes exit 1."""
    case = write_case(CASE.format(steps=3, extra=HANG))
    out = tmp_path / "out"
    leader, follower = two_nodes(case, out, seed_cache, "--timeout", "300")
    hung = out / "case" / "faulty" / "rank1.log"
    deadline = time.monotonic() + 240
    while not (hung.is_file() and "planted fault: rank 1 hangs" in hung.read_text()):
        if time.monotonic() > deadline:
            pytest.fail(f"rank 1 never reached its planted hang\n{log_of(out, 0)}")
        time.sleep(0.2)
    agent = [p for p in descendants(follower.pid) if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes()]
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


def test_slurm_job_script_runs_one_parity_per_node(write_case, tmp_path, seed_cache, no_stray_processes):
    """The script is checked for what it asks of SLURM, then run under stand-ins for scontrol, srun and
    hostname that play a 2-node allocation on localhost (srun starts one task per node with SLURM_NODEID)."""
    case = write_case(CASE.format(steps=2, extra="").replace("= 8", "= 2"))  # 2 ranks: one per node, the cheapest
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "parity.cli", "run", str(case), "--device", "cpu", "--out", str(out),
            "--baselines", str(tmp_path / "baselines"), "--update-baselines=new", "--launcher", "slurm", "--nnodes", "2"]
    script = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "--gpus-per-node" not in script  # a CPU run asks for no GPUs
    assert f"#SBATCH --chdir={tmp_path}" in script
    assert "--node-rank \"$SLURM_NODEID\"" in script and "--nnodes 2" in script and str(case) in script
    gpu_script = subprocess.run([*argv[:6], "cuda", *argv[7:]], capture_output=True, text=True, check=True).stdout
    assert "#SBATCH --gpus-per-node=1" in gpu_script  # 2 ranks over 2 nodes

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": 'echo localhost',
        "hostname": 'echo 127.0.0.1',
        "srun": '\n'.join([
            'if [ "$1" = "--nodes=1" ]; then shift 4; exec "$@"; fi  # srun --nodes=1 --ntasks=1 -w HOST CMD',
            'shift  # --kill-on-bad-exit=1',
            'pids=(); for i in 0 1; do SLURM_NODEID=$i "$@" > "$SRUN_LOGS/task$i.log" 2>&1 & pids+=($!); done',
            'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc']),
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="localhost",
               PARITY_RDZV_PORT=str(free_port()), PARITY_CACHE=str(seed_cache), SRUN_LOGS=str(tmp_path))
    job = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    logs = "\n".join((tmp_path / f"task{i}.log").read_text() for i in (0, 1))
    assert job.returncode == 0, logs + job.stderr
    assert "case: PASS" in (tmp_path / "task0.log").read_text()  # node 0 judged
    assert "launch1: ok" in (tmp_path / "task1.log").read_text()  # node 1 followed
    assert records.read_json(out / "case" / "replicate" / "run.json")["world_size"] == 2


def test_slurm_submit_writes_the_script_and_calls_sbatch(write_case, tmp_path):
    """--submit, against a stand-in sbatch that echoes what it was given (no test submits to a real cluster)."""
    case = write_case(CASE.format(steps=2, extra=""))
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
    case = write_case(CASE.format(steps=2, extra=""))
    done = subprocess.run([sys.executable, "-m", "parity.cli", "run", str(case), "--device", "cpu",
                           "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_node_given_other_cases_is_refused_on_both(write_case, tmp_path, seed_cache, no_stray_processes):
    port = free_port()
    case = write_case(CASE.format(steps=2, extra=""))
    other = write_case(CASE.format(steps=3, extra=""), name="other")
    follower = parity_run(other, tmp_path / "out", seed_cache, node=1, port=port)
    leader = parity_run(case, tmp_path / "out", seed_cache, node=0, port=port)
    assert leader.wait(timeout=120) == 2 and follower.wait(timeout=60) == 2
    for node in (0, 1):
        assert "node(s) 1 were given other cases, case files or options" in log_of(tmp_path / "out", node)
    assert not (tmp_path / "out").exists()  # refused before anything was written


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
