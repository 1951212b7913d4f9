"""A rank that hangs or raises: the run fails with a clear message and leaves no process behind."""

import os
from pathlib import Path

import pytest

from parity.core import records
from parity.core.lifeline import alive, descendants
from parity.run.runner import run_case
from parity.case.loader import load_case

CASE = """
description = "a healthy reference and a setup with a planted fault"
[train]
model = "tiny"
steps = 3
global_batch = 4
seq_len = 16
[setups.healthy]
dp_api = "fully_shard"
dp_shard = 2
[setups.faulty]
dp_api = "fully_shard"
dp_shard = 2
fault = "{fault}"
"""


def parity_ranks(scope: Path) -> list[int]:
    """Live torchrun and rank processes of this test: their command lines name a plan under its tmp_path.

    Scoped so that tests running beside it (pytest-xdist) and their ranks are not counted.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            ours = b"parity.rank" in cmd or b"torch.distributed.run" in cmd
            if ours and str(scope).encode() in cmd:
                pids.append(int(entry))
    return pids


@pytest.fixture
def no_stray_ranks(tmp_path):
    yield
    assert parity_ranks(tmp_path) == [], "processes left behind"


@pytest.mark.slow
def test_crashing_rank_fails_the_run_with_its_message(write_case, tmp_path, seed_cache, no_stray_ranks):
    case = load_case(write_case(CASE.format(fault="crash")))
    results = run_case(case, tmp_path / "out", "cpu", cache=seed_cache, timeout_s=120)
    assert results["healthy"].status == "ok"  # the setup before the crash completed and keeps its files
    faulty = results["faulty"]
    assert faulty.status == "failed"
    assert "a rank failed: setup case/faulty rank 1: RuntimeError: planted fault: rank 1 crashes at step 2" in faulty.message
    run = records.read_json(tmp_path / "out" / case.name / "faulty" / "run.json")
    assert run["status"] == "failed" and "planted fault" in run["message"]
    assert (tmp_path / "out" / case.name / "faulty" / "rank1.log").is_file()


@pytest.mark.slow
def test_hanging_rank_is_killed_after_the_timeout(write_case, tmp_path, seed_cache, no_stray_ranks):
    case = load_case(write_case(CASE.format(fault="hang")))
    # The faulty setup's clock restarts when it starts, a step before its hang: 15 s is its whole wait, and
    # time enough for the launch's start-up and the healthy setup on a loaded 2-core machine (about 5 s idle).
    results = run_case(case, tmp_path / "out", "cpu", cache=seed_cache, timeout_s=15)
    faulty = results["faulty"]
    assert results["healthy"].status == "ok"
    assert faulty.status == "timeout"
    assert "timed out after 15 s" in faulty.message
    assert "planted fault: rank 1 hangs at step 2" in faulty.message  # the tail of rank 1's log
    assert "rank0.log" in faulty.message and "rank1.log" in faulty.message
    assert records.read_json(tmp_path / "out" / case.name / "faulty" / "run.json")["status"] == "timeout"
    assert not (tmp_path / "out" / case.name / "faulty" / "metrics.csv").exists()


def test_descendants_finds_grandchildren(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)'], start_new_session=True); time.sleep(30)"])
    try:
        import time

        deadline = time.monotonic() + 10
        while not descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        while len(descendants(proc.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = descendants(proc.pid)
        assert len(found) >= 1
    finally:
        from parity.core.process import kill_tree

        kill_tree(proc, grace_s=2)
    assert not any(alive(p) for p in found)


@pytest.mark.slow
def test_killing_parity_itself_takes_torchrun_and_ranks_down(write_case, tmp_path, seed_cache, no_stray_ranks):
    """SIGKILL on `parity run` (a cancelled CI job) leaves nothing: PDEATHSIG chains parity -> torchrun -> ranks."""
    import signal
    import subprocess
    import sys
    import time

    path = write_case(CASE.format(fault="hang"))
    proc = subprocess.Popen([sys.executable, "-m", "parity.cli", "run", str(path), "--device", "cpu",
                             "--out", str(tmp_path / "out"), "--timeout", "600"],
                            env=dict(os.environ, PARITY_CACHE=str(seed_cache)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(descendants(proc.pid)) < 3 and time.monotonic() < deadline:  # torchrun + 2 ranks
        time.sleep(0.2)
    started = descendants(proc.pid)
    assert len(started) >= 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    survivors = lambda: [p for p in started if alive(p)]  # noqa: E731
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert survivors() == []


@pytest.mark.slow
def test_sigterm_on_parity_records_interrupted_and_cleans_scratch(write_case, tmp_path, seed_cache, no_stray_ranks):
    """SIGTERM (`timeout`, a CI cancel that asks first) unwinds: ranks killed, setups marked interrupted,
    no scratch files left, exit 130."""
    import signal
    import subprocess
    import sys
    import time

    path = write_case(CASE.format(fault="hang"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "parity.cli", "run", str(path), "--device", "cpu",
                             "--out", str(out), "--timeout", "600"],
                            env=dict(os.environ, PARITY_CACHE=str(seed_cache)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (out / "case" / "healthy" / "run.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)  # the healthy setup finished; the faulty one is hanging now
    assert (out / "case" / "healthy" / "run.json").is_file()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert records.read_json(out / "case" / "healthy" / "run.json")["status"] == "ok"
    faulty = records.read_json(out / "case" / "faulty" / "run.json")
    assert faulty["status"] == "interrupted" and "interrupted" in faulty["message"]
    leftovers = [p.name for p in (out / "case").iterdir() if p.name.startswith((".launch-", ".progress"))]
    assert leftovers == []


def test_lifeline_wrapper_refuses_to_start_a_program_once_its_launcher_is_gone(tmp_path):
    """`python parity/core/lifeline.py PARENT PROGRAM`: a PARENT that is not (or no longer) its parent means the
    launcher died before the guard was armed; the program must not start, orphaned for good."""
    import subprocess
    import sys

    from parity.core import lifeline

    done = subprocess.run([sys.executable, lifeline.__file__, "1", "touch", "started"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 1 and "the launcher (pid 1) is gone; not starting touch" in done.stderr
    assert not (tmp_path / "started").exists()
    ran = subprocess.run([sys.executable, "-c", "import subprocess, sys; from parity.core.lifeline import wrapped; "
                          "sys.exit(subprocess.run(wrapped(['sh', '-c', 'exit 7'])).returncode)"])
    assert ran.returncode == 7  # with its real parent, the wrapper runs the program and exits with its code


def test_the_supervisor_ends_as_its_program_did_and_passes_signals_on():
    """Killed by a signal: the supervisor dies of the same one. A program it cannot start: 127 and one line.
    SIGTERM to the supervisor reaches the program, which may take its time to stop."""
    import signal
    import subprocess
    import time

    from parity.core.lifeline import wrapped

    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV):
        assert subprocess.run(wrapped(["sh", "-c", f"kill -{sig.name[3:]} $$"])).returncode == -sig
    missing = subprocess.run(wrapped(["no-such-program-here"]), capture_output=True, text=True)
    assert missing.returncode == 127
    assert missing.stderr == "parity.core.lifeline: cannot start no-such-program-here: No such file or directory\n"
    proc = subprocess.Popen(wrapped(["sh", "-c", "trap 'exit 42' TERM; while :; do sleep 0.1; done"]))
    try:
        deadline = time.monotonic() + 10
        while not descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the supervisor sets its handlers just after the fork
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 42
    finally:
        if proc.poll() is None:
            from parity.core.process import kill_tree

            kill_tree(proc, grace_s=1)


LANES_CASE = """
description = "two world-size-1 setups, long enough to be running when the run is stopped"
[train]
model = "tiny"
steps = 5000
global_batch = 4
seq_len = 16
[probes]
enabled = false
[setups.one]
dp_api = "none"
[setups.two]
dp_api = "none"
lr = 0.004
"""
# `parity run` with two cores for its lanes whatever this machine has, so both lanes always run.
TWO_CORES = "import os, sys; os.sched_getaffinity = lambda pid: {0, 1}; from parity.cli import main; sys.exit(main())"


@pytest.mark.slow
def test_sigterm_while_lanes_run_stops_both_and_leaves_nothing(write_case, tmp_path, seed_cache, no_stray_ranks):
    """The lanes of a split launch run in threads, each waiting on its own torchrun: SIGTERM must still kill
    every rank of both, mark both setups interrupted and exit 130."""
    import signal
    import subprocess
    import sys
    import time

    path = write_case(LANES_CASE)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", TWO_CORES, "run", str(path), "--device", "cpu", "--out", str(out)],
                            env=dict(os.environ, PARITY_CACHE=str(seed_cache)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob(".launch-*/launch*.progress"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # both lanes are training
    assert len(list(out.glob(".launch-*/launch*.progress"))) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    for name in ("one", "two"):
        run = records.read_json(out / "case" / name / "run.json")
        assert run["status"] == "interrupted" and "interrupted" in run["message"], name
    assert not list(out.glob(".launch-*"))


def test_a_log_goes_into_a_message_by_its_end_only(tmp_path):
    """A runaway log (megabytes of long progress lines) is never read whole, and its tail stays short."""
    from parity.core import process

    logs = tmp_path / "logs"
    logs.mkdir()
    line = "x" * 2000 + "\n"
    for log in (tmp_path / "command.log", logs / "rank0.log"):
        log.write_text(line * 2000 + "the last line\n")
    for shown in (process._tail(tmp_path / "command.log"), process.log_tails([logs])):
        header, _, body = shown.partition("\n")
        assert body.endswith("the last line") and body.startswith("...x")  # cut inside a line, and says so
        assert len(body) <= process.LOG_TAIL_BYTES + 3, len(body)


def test_first_error_reads_each_rank_logs_end_and_skips_lines_that_only_look_like_marks(tmp_path):
    from parity.core import process
    from parity.core.lifeline import ERROR_MARK

    (tmp_path / "rank0.log").write_text(f"{ERROR_MARK} 5.0 early, then a long log\n" + "." * process.ERROR_SCAN_BYTES
                                        + f"\n{ERROR_MARK} not-a-time printed by someone else\n"
                                        + f"{ERROR_MARK} 9.5 rank 0: RuntimeError: boom\n")
    (tmp_path / "rank1.log").write_text(f"{ERROR_MARK} nan lost its peer\n{ERROR_MARK} 9.7 rank 1: lost its peer\n")
    assert process.first_error([tmp_path]) == "rank 0: RuntimeError: boom (1 other rank(s) failed after it)"
