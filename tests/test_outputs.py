"""What a run may write and delete: only inside its folders, only what it made, one run per case at a time."""

import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from parity import records
from parity.errors import InputError
from parity.paths import CASE_MARKER, inside, name_problem
from parity.rundir import case_lock, fresh_case_dir, prepare_out

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


def test_flipped_byte_in_the_seed_cache_is_rebuilt_and_the_run_matches_the_committed_baselines(tmp_path):
    """The committed debugmodel seed, damaged in the cache: found before launch, moved aside, rebuilt; the
    run then matches the stored baselines (bit for bit on the platform that made them)."""
    from parity.seed import resolve_seed

    cache = tmp_path / "cache"
    built = resolve_seed("debugmodel", 42, "float32", cache)
    shard = next(built.path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "cases/replicate_vs_hsdp.toml", "--device", "cpu",
                           "--steps", "2", "--out", str(out), "--no-report"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PARITY_CACHE=str(cache)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{built.path} is corrupt (its files hash to" in proc.stderr and "and rebuilt" in proc.stderr
    assert len(list(cache.glob(".corrupt-*"))) == 1
    run = records.read_json(out / "replicate_vs_hsdp" / "replicate" / "run.json")
    assert run["seed_checkpoint_sha256"] == built.sha256
    verdict = records.read_json(out / "replicate_vs_hsdp" / "verdict.json")
    assert verdict["passed"] and {b["status"] for b in verdict["baselines"]} == {"match"}
