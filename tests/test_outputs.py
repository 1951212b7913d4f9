"""What a run may write and delete: only inside its folders, only what it made, one run per case at a time."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from parity.core import records
from parity.core.errors import InputError
from parity.core.paths import CASE_MARKER, inside, name_problem
from parity.core.rundir import (case_lock, check_apart, check_out, claim, clear_earlier_outputs, foreign_entries,
                           fresh_case_dir, ours, prepare_out, work_dir)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["hsdp_8x1", "a", "A-b_9", "x" * 64])
def test_safe_names_pass(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["", ".", "..", "...", "../x", "/abs", "a/b", "a.b", "-rf", "a\nb", "a b", "é",
                                  "x" * 65, None, 3])
def test_unsafe_names_are_refused(name):
    assert "allowed: letters, digits" in name_problem(name)


@pytest.mark.parametrize("parts", [("..",), (".",), ("",), ("a/b",), ("a", ".."), ("/etc",), ("a\nb",)])
def test_inside_refuses_components_that_leave_the_root(tmp_path, parts):
    with pytest.raises(InputError, match="refusing"):
        inside(tmp_path, *parts)


def test_inside_refuses_a_symlink_that_leads_out(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "case").symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        inside(root, "case", "setup")
    assert inside(root, "other", "setup") == root / "other" / "setup"


def test_case_folder_is_deleted_only_when_marked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = fresh_case_dir(out, "demo")
    (mine / "old.csv").write_text("stale")
    again = fresh_case_dir(out, "demo")  # our own folder from an earlier run: emptied
    assert sorted(p.name for p in again.iterdir()) == [CASE_MARKER]

    theirs = out / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("keep me")
    with pytest.raises(InputError, match="not made by parity; refusing to delete"):
        fresh_case_dir(out, "theirs")
    assert (theirs / "thesis.tex").read_text() == "keep me"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / CASE_MARKER).write_text("linked\n")
    (out / "linked").symlink_to(elsewhere)
    with pytest.raises(InputError):
        fresh_case_dir(out, "linked")
    assert (elsewhere / CASE_MARKER).is_file()


def test_second_run_of_a_case_into_one_out_fails_at_once(tmp_path):
    with case_lock(tmp_path, "demo"):
        with pytest.raises(InputError, match="another parity run is writing this case now"):
            with case_lock(tmp_path, "demo"):
                pass
        with case_lock(tmp_path, "other"):  # other cases (pytest-xdist workers) are not blocked
            pass
    with case_lock(tmp_path, "demo"):  # released
        pass


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        records.write_json(tmp_path / "run.json", {"status": "ok"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == mode


def test_concurrent_cli_run_into_one_out_is_refused_with_one_line(tmp_path, write_case, seed_cache):
    path = write_case('description = "x"\n[train]\nmodel = "tiny"\nsteps = 1\nglobal_batch = 2\nseq_len = 8\n'
                      '[setups.a]\ndp_api = "none"\n[setups.b]\ndp_api = "none"\n', "busy")
    out = tmp_path / "out"
    with case_lock(prepare_out(out), "busy"):  # what a first run holds while it runs
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", str(path), "--device", "cpu", "--out",
                               str(out), "--no-report"], capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, PARITY_CACHE=str(seed_cache)), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"parity: error: {out / 'busy'}: another parity run is writing this case now; wait for it or choose another --out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the second run wrote nothing
    assert sorted(before) == [".busy.lock", ".parity-run"]


@pytest.mark.slow
def test_flipped_byte_in_the_seed_cache_is_rebuilt_and_the_run_matches_the_committed_baselines(tmp_path):
    """The committed debugmodel seed, damaged in the cache: found before launch, moved aside, rebuilt; the
    run then matches the stored baselines (bit for bit on the platform that made them)."""
    from parity.trainers.seed import resolve_seed

    cache = tmp_path / "cache"
    built = resolve_seed("debugmodel", 42, "float32", cache)
    shard = next(built.path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "cases/replicate_vs_hsdp.toml", "--device", "cpu",
                           "--steps", "1", "--out", str(out), "--no-report"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PARITY_CACHE=str(cache)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{built.path} is corrupt (its files hash to" in proc.stderr and "and rebuilt" in proc.stderr
    assert len(list(cache.glob(".corrupt-*"))) == 1
    run = records.read_json(out / "replicate_vs_hsdp" / "replicate" / "run.json")
    assert run["seed_checkpoint_sha256"] == built.sha256
    verdict = records.read_json(out / "replicate_vs_hsdp" / "verdict.json")
    assert verdict["passed"] and {b["status"] for b in verdict["baselines"]} == {"match"}


def test_a_run_directory_knows_what_parity_wrote_there(tmp_path):
    """parity recognises its own earlier outputs by the run marker, not by their names."""
    out = prepare_out(tmp_path / "out")
    assert foreign_entries(out) == []
    for name in ("report.md", "plan-gw0.json"):
        claim(out, name).write_text("ours\n")
    fresh_case_dir(out, "demo")
    with case_lock(out, "demo"):
        pass
    with work_dir(out, ".launch-") as work:
        assert work.name in ours(out)
    assert not work.exists() and work.name not in ours(out)
    assert check_out(out) == out  # an earlier run's outputs: the next run may go ahead

    (out / "notes.txt").write_text("mine\n")
    (out / "stranger").mkdir()
    with pytest.raises(InputError, match=r"holds 'notes.txt', 'stranger', which parity did not write"):
        check_out(out)
    with pytest.raises(InputError, match="exists and parity did not write it"):
        claim(out, "notes.txt")  # never overwritten
    assert (out / "notes.txt").read_text() == "mine\n"


def test_clearing_an_earlier_session_deletes_only_what_parity_wrote(tmp_path):
    out = prepare_out(tmp_path / "out")
    claim(out, "report.md").write_text("old report\n")
    claim(out, "plan-gw1.json").write_text("{}\n")
    with case_lock(out, "demo"):
        pass
    fresh_case_dir(out, "demo")
    (out / "theirs").mkdir()
    (out / "theirs" / "thesis.tex").write_text("keep me")
    clear_earlier_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == [".demo.lock", ".parity-run", "theirs"]
    assert (out / "theirs" / "thesis.tex").read_text() == "keep me"
    assert ours(out) == {".demo.lock"}


@pytest.mark.parametrize("out, baselines, message", [
    ("a", "a", "are the same folder"),
    ("a/b", "a", "the run directory lies inside the baseline root"),
    ("a", "a/b", "the baseline root lies inside the run directory"),
    ("link", "a", "are the same folder"),
])
def test_out_and_baselines_may_not_overlap(tmp_path, out, baselines, message):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with pytest.raises(InputError, match=message):
        check_apart(tmp_path / out, tmp_path / baselines)
    check_apart(tmp_path / "a", tmp_path / "ab")  # a shared prefix is no overlap


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 1 MiB tmpfs filled to the last byte: writable when checked, full when written."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    for i in range(10000):  # then the inodes and the last partial blocks
        try:
            (folder / f"f{i}").write_bytes(b"\0")
        except OSError:
            break


@pytest.mark.slow
def test_a_full_disk_under_the_baselines_fails_that_case_in_its_verdict_and_the_suite_goes_on(
        tmp_path, write_case, seed_cache, full_disk):
    """Once training has begun, a baseline that cannot be written fails its setup with one line in the verdict
    and the report; the other case of the suite is still judged and reported; exit 1, no traceback."""
    body = ('description = "x"\n[train]\nmodel = "tiny"\nsteps = 2\nglobal_batch = 2\nseq_len = 8\n'
            '[setups.a]\ndp_api = "none"\n[setups.b]\ndp_api = "none"\n')
    kept, written = write_case(body, "kept"), write_case(body.replace("steps = 2", "steps = 3"), "written")
    env = dict(os.environ, PARITY_CACHE=str(seed_cache))

    def parity_run(out, *extra):
        return subprocess.run([sys.executable, "-m", "parity.cli", "run", str(kept), str(written), "--device", "cpu",
                               "--out", str(out), "--baselines", str(full_disk), *extra],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=300)

    first = subprocess.run([sys.executable, "-m", "parity.cli", "run", str(kept), "--device", "cpu", "--out",
                            str(tmp_path / "first"), "--baselines", str(full_disk), "--update-baselines=new",
                            "--no-report"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    _fill(full_disk)
    proc = parity_run(tmp_path / "out", "--update-baselines=new")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    verdicts = {name: records.read_json(tmp_path / "out" / name / "verdict.json") for name in ("kept", "written")}
    assert verdicts["kept"]["passed"], verdicts["kept"]["problems"]
    assert not verdicts["written"]["passed"]
    for setup in ("a", "b"):
        line = f"{full_disk}/written/{setup}.cpu.csv: cannot write it (No space left on device)"
        assert f"baseline {setup}: {line}" in verdicts["written"]["problems"], verdicts["written"]["problems"]
        assert f"baseline {setup} [cpu, exact]: error FAIL: {line}" in proc.stdout
    report_md = (tmp_path / "out" / "report.md").read_text()
    assert "b.cpu.csv: cannot write it (No space left on device)" in report_md and "| kept |" in report_md


def test_a_record_that_cannot_be_read_after_the_run_fails_the_case_in_its_verdict(tmp_path):
    """`parity compare` refuses a malformed run directory (exit 2); for a case this process has just run,
    the same problem is a failed case with one line in its verdict, and the suite goes on."""
    from test_report import _metrics, make_case

    from parity.session import judge, judge_run
    from parity.case.schema import Case, Expect, Setup, Tolerance, Train

    out = tmp_path / "run"
    make_case(out, "damaged", {"a": _metrics(), "b": _metrics()}, verdict=False)
    (out / "damaged" / "b" / "metrics.csv").write_text("step,loss\n1,not-a-number\n")
    tol = {m: Tolerance(0.0, 0.0) for m in ("loss", "grad_norm", "weights")}
    case = Case(name="damaged", path=Path("cases/damaged.toml"), description="d", sha256="cd" * 32,
                setups=(Setup(name="a", train=Train()), Setup(name="b", train=Train())),
                expect=Expect(mode="bitwise", tolerance=tol, tolerance_source={m: "case" for m in tol}))
    with pytest.raises(InputError, match="metrics.csv"):
        judge(case, out, tmp_path / "baselines", None)
    verdict = judge_run(case, out, tmp_path / "baselines", None)
    assert not verdict.passed and len(verdict.problems) == 1
    assert verdict.problems[0].startswith(f"not judged: {out / 'damaged' / 'b' / 'metrics.csv'}")
    written = records.read_json(out / "damaged" / "verdict.json")  # the report reads it like any verdict
    assert written["passed"] is False and written["problems"] == verdict.problems


def test_a_baseline_damaged_while_the_case_trained_fails_the_case_in_its_verdict(tmp_path):
    """Baselines are checked before anything runs; one that changes during the run is found when judging."""
    from test_report import _metrics, make_case

    from parity.session import judge_run
    from parity.case.schema import Case, Expect, Setup, Tolerance, Train

    out, root = tmp_path / "run", tmp_path / "baselines"
    make_case(out, "pair", {"a": _metrics(), "b": _metrics()}, verdict=False)
    tol = {m: Tolerance(0.0, 0.0) for m in ("loss", "grad_norm", "weights")}
    case = Case(name="pair", path=Path("cases/pair.toml"), description="d", sha256="cd" * 32,
                setups=(Setup(name="a", train=Train()), Setup(name="b", train=Train())),
                expect=Expect(mode="bitwise", tolerance=tol, tolerance_source={m: "case" for m in tol}))
    assert judge_run(case, out, root, "new").passed  # writes both baselines
    damaged = root / "pair" / "b.cpu-gloo.csv"
    damaged.write_bytes(b"\x00\xff not a csv")
    verdict = judge_run(case, out, root, None)
    assert not verdict.passed
    assert verdict.problems == [f"not judged: {damaged}: not a text file (binary content); expected CSV; fix or "
                                   f"recreate it with `parity run cases/pair.toml --update-baselines=failing` (or "
                                   "`pytest --pyargs 'parity.test_parity::test_case[pair]' "
                                   "--parity-update-baselines=failing`)"], verdict.problems


def test_an_atomic_write_in_progress_is_parity_s_own(tmp_path):
    """Another process's atomic write of a listed file (or one a killed run left) is not someone else's work."""
    out = prepare_out(tmp_path / "out")
    claim(out, "plan-gw1.json")
    (out / ".plan-gw1.json.k2x_9abc.tmp").write_text("{")
    (out / "..parity-run.zcdgiz7t.tmp").write_text("{")
    assert foreign_entries(out) == []
    (out / ".notes.txt.k2x_9abc.tmp").write_text("x")  # the temporary file of a name parity never wrote
    assert foreign_entries(out) == [".notes.txt.k2x_9abc.tmp"]
