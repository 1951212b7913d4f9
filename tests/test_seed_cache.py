"""The seed checkpoint cache: every entry checked against its content hash before use, repaired when not."""

import os
import shutil
import subprocess
import sys

import pytest

from parity.core.errors import InputError
from parity.rank.model import build_model
from parity.core.presets import PRESETS
from parity.trainers.seed import cache_key, resolve_seed, state_dict_sha256
from parity.trainers.seed_cache import check_readable, files_sha256, verify

ARGS = ("tiny", 5, "float32")
BUILD = ("import sys; from parity.trainers.seed import resolve_seed; "
         "print(resolve_seed('tiny', 5, 'float32', sys.argv[1]).sha256)")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One built cache; each test damages its own copy."""
    cache = tmp_path_factory.mktemp("pristine") / "cache"
    info = resolve_seed(*ARGS, cache)
    return cache, info.sha256


@pytest.fixture
def built(pristine, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pristine[0], cache, symlinks=True)
    return cache, pristine[1]


def shard(cache, sha):
    return next((cache / sha).glob("*.distcp"))


def loaded_weights(path) -> str:
    from parity.rank.build import load_seed

    model = build_model(PRESETS["tiny"], 1, 99)  # a different init, so the load must do the work
    with pytest.warns(UserWarning, match="single process"):
        load_seed([model], str(path))
    return state_dict_sha256(model.state_dict())


def snapshot(root):
    """Every path under root with its mtime and size: equal snapshots mean nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


def assert_repaired(cache, sha, info, word="corrupt"):
    """Same hash as before, weights intact, the bad entry moved aside (not deleted), and a note saying so."""
    assert info.sha256 == sha and info.path == cache / sha and verify(info.path, sha)
    assert len(info.notes) == 1 and "\n" not in info.notes[0]
    assert word in info.notes[0] and "rebuilt" in info.notes[0] and str(cache / sha) in info.notes[0]
    assert loaded_weights(info.path) == state_dict_sha256(build_model(PRESETS["tiny"], 1, 5).state_dict())
    assert not list(cache.glob(".building-*"))


def test_built_once_then_cached_and_private(tmp_path):
    cache = tmp_path / "new" / "cache"
    info = resolve_seed(*ARGS, cache)
    assert info.path.name == info.sha256 == files_sha256(info.path) and info.notes == ()
    assert (cache.stat().st_mode & 0o777) == 0o700  # the metadata inside is unpickled: nobody else writes it
    assert resolve_seed(*ARGS, cache) == info
    assert resolve_seed("tiny", 6, "float32", cache).sha256 != info.sha256
    assert resolve_seed("tiny", 5, "bfloat16", cache).sha256 != info.sha256
    assert loaded_weights(info.path) == state_dict_sha256(build_model(PRESETS["tiny"], 1, 5).state_dict())
    assert not list(cache.glob(".building-*"))


@pytest.mark.slow
def test_build_is_byte_deterministic_across_processes(tmp_path, pristine):
    """A rebuilt entry must keep its hash: baselines record it as seed_checkpoint_sha256."""
    code = BUILD
    shas = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"c{i}")], capture_output=True, text=True,
                           check=True).stdout.strip() for i in range(2)}
    assert shas == {pristine[1]}


def test_flipped_byte_is_found_before_use_moved_aside_and_rebuilt(built):
    cache, sha = built
    path = shard(cache, sha)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert not verify(cache / sha, sha)
    info = resolve_seed(*ARGS, cache)
    assert_repaired(cache, sha, info)
    aside = list(cache.glob(f".corrupt-{sha}-*"))
    assert len(aside) == 1 and (aside[0] / path.name).read_bytes() == bytes(data)  # kept for inspection
    assert aside[0].name in info.notes[0]


def test_truncated_shard(built):
    cache, sha = built
    path = shard(cache, sha)
    path.write_bytes(path.read_bytes()[:1000])
    assert_repaired(cache, sha, resolve_seed(*ARGS, cache))


def test_deleted_shard(built):
    cache, sha = built
    shard(cache, sha).unlink()
    assert_repaired(cache, sha, resolve_seed(*ARGS, cache))


def test_deleted_metadata(built):
    cache, sha = built
    (cache / sha / ".metadata").unlink()
    assert_repaired(cache, sha, resolve_seed(*ARGS, cache))


def test_deleted_entry(built):
    cache, sha = built
    shutil.rmtree(cache / sha)
    assert_repaired(cache, sha, resolve_seed(*ARGS, cache), word="missing")


def test_extra_file_is_corruption_too(built):
    cache, sha = built
    (cache / sha / "notes.txt").write_text("x")
    info = resolve_seed(*ARGS, cache)
    assert_repaired(cache, sha, info)
    assert "notes.txt" in info.notes[0]


@pytest.mark.parametrize("garbage", [b"../../outside\n", b"\xff\x00" * 40, b"", b"0" * 63],
                         ids=["path", "binary", "empty", "short"])
def test_garbage_key_file(built, garbage, tmp_path):
    cache, sha = built
    (tmp_path / "outside").mkdir()
    sentinel = tmp_path / "outside" / "keep"
    sentinel.write_text("keep")
    key = cache / "keys" / f"{cache_key(*ARGS)}.txt"
    key.write_bytes(garbage)
    info = resolve_seed(*ARGS, cache)
    assert info.sha256 == sha and "garbage key file" in info.notes[0] and "\n" not in info.notes[0]
    assert key.read_text() == sha + "\n" and len(list(cache.glob(".corrupt-*"))) == 1
    assert sentinel.read_text() == "keep"


def test_symlinked_entry_is_not_followed_nor_deleted_outside(built, tmp_path):
    """An entry that is a symlink (even to a valid copy) is moved aside as a link; its target is untouched."""
    cache, sha = built
    outside = tmp_path / "outside"
    shutil.move(cache / sha, outside)  # a valid copy: only refusing the link itself can catch it
    (cache / sha).symlink_to(outside)
    before = snapshot(outside)
    info = resolve_seed(*ARGS, cache)
    assert_repaired(cache, sha, info)
    assert not (cache / sha).is_symlink()
    aside = list(cache.glob(f".corrupt-{sha}-*"))
    assert len(aside) == 1 and aside[0].is_symlink()
    assert snapshot(outside) == before


def test_symlinked_shard_is_corruption(built, tmp_path):
    cache, sha = built
    path = shard(cache, sha)
    shutil.move(path, tmp_path / "real.distcp")
    path.symlink_to(tmp_path / "real.distcp")
    assert not verify(cache / sha, sha)
    assert_repaired(cache, sha, resolve_seed(*ARGS, cache))
    assert (tmp_path / "real.distcp").is_file()


def test_entry_with_good_name_but_no_key_is_checked_too(built):
    """A build that lands on an existing, damaged entry replaces it rather than trusting it."""
    cache, sha = built
    (cache / "keys" / f"{cache_key(*ARGS)}.txt").unlink()
    (cache / sha / ".metadata").write_bytes(b"garbage")
    info = resolve_seed(*ARGS, cache)
    assert_repaired(cache, sha, info)


def test_a_killed_builders_leftovers_are_removed_by_the_next_build(built):
    cache, sha = built
    (cache / ".building-dead").mkdir()
    (cache / ".building-dead" / "__0_0.distcp").write_bytes(b"half")
    shard(cache, sha).unlink()
    resolve_seed(*ARGS, cache)
    assert not list(cache.glob(".building-*"))


def test_built_cache_is_used_read_only(built, monkeypatch):
    """Nothing in a complete, valid cache is created or written: it works on a read-only filesystem."""
    cache, sha = built
    (cache / ".lock").unlink(missing_ok=True)
    before = snapshot(cache)
    real_open = os.open

    def no_writes(path, flags, *a, **kw):
        assert not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT), f"opened {path} for writing"
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_writes)
    info = resolve_seed(*ARGS, cache)
    monkeypatch.undo()
    assert info == (cache / sha, sha, ())
    assert snapshot(cache) == before and not (cache / ".lock").exists()


def test_cache_that_is_a_file_is_one_line_input_error(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    with pytest.raises(InputError) as e:
        resolve_seed(*ARGS, cache)
    msg = str(e.value)
    assert str(cache) in msg and "PARITY_CACHE" in msg and "\n" not in msg
    assert cache.read_text() == "not a directory"


def test_cache_under_a_file_is_one_line_input_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="seed cache .*f/cache.*writ"):
        resolve_seed(*ARGS, tmp_path / "f" / "cache")


def test_external_checkpoint_is_hashed_by_its_files(built, tmp_path):
    cache, sha = built
    ext = tmp_path / "mine"
    shutil.copytree(cache / sha, ext)
    before = snapshot(tmp_path / "mine")
    info = resolve_seed(*ARGS, tmp_path / "unused", external=ext)
    assert info == (ext, sha, ())  # the same files hash the same wherever they are
    assert not (tmp_path / "unused").exists() and snapshot(ext) == before


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata cannot be read"),
    (lambda d: (d / ".metadata").unlink(), "no .metadata"),
    (lambda d: (d / "README").write_text("x"), "unexpected file 'README'"),
    (lambda d: shutil.rmtree(d), "No such file"),
])
def test_bad_external_checkpoint_is_input_error_before_launch(built, tmp_path, damage, message):
    cache, sha = built
    ext = tmp_path / "mine"
    shutil.copytree(cache / sha, ext)
    damage(ext)
    with pytest.raises(InputError, match=f"seed_checkpoint {ext}: .*{message}") as e:
        resolve_seed(*ARGS, tmp_path / "unused", external=ext)
    assert "\n" not in str(e.value)


def test_check_readable(built, tmp_path):
    cache, sha = built
    check_readable(cache / sha)
    (tmp_path / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="cannot be read"):
        check_readable(tmp_path)


def test_verify_after_launch_sees_a_change(built):
    cache, sha = built
    assert verify(cache / sha, sha)
    with open(shard(cache, sha), "ab") as f:
        f.write(b"\0")
    assert not verify(cache / sha, sha)
    assert not verify(cache / "missing", sha)


@pytest.mark.slow
def test_concurrent_builders_agree(tmp_path, pristine):
    code = BUILD
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c")], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    assert {p.communicate()[0].strip() for p in procs} == {pristine[1]}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([".lock", "keys", pristine[1]])


def test_a_case_may_name_an_existing_dcp_seed(tmp_path, write_case):
    """`seed_checkpoint = PATH` uses that checkpoint; its content hash equals the built seed's."""
    from parity.run.runner import seed_for
    from parity.trainers import load_case

    info = resolve_seed("tiny", 42, "float32", tmp_path / "cache")
    case_text = f'description = "x"\nseed_checkpoint = "{info.path}"\n[train]\nmodel = "tiny"\n' \
                '[setups.a]\ndp_api = "none"\n[setups.b]\ndp_api = "none"\n'
    case = load_case(write_case(case_text))
    got = seed_for(case, tmp_path / "unused")
    assert (str(got.path), got.sha256) == (str(info.path), info.sha256)
    assert not (tmp_path / "unused").exists()
