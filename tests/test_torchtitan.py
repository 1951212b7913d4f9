"""torchtitan setups: the preset's command, its seed-checkpoint key, and the loss_compare workflow
(one configuration at two commits of a torchtitan source tree) end to end on CPU ranks."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from parity.trainers import torchtitan
from parity.trainers import load_case

try:
    import torchtitan as titan
except ImportError:  # the extra is absent: the tests that run torchtitan skip, the one about its absence runs
    titan = None
needs_titan = pytest.mark.skipif(titan is None, reason=f"torchtitan not installed; {torchtitan.INSTALL}")

CASE = """description = "one torchtitan configuration at four commits of a source tree"
[train]
steps = 2
seq_len = 64
[setups.main]
trainer = "torchtitan"
world_size = 1
source = "{repo}"
ref = "main"
args = ["--training.local-batch-size=2"]
[setups.comment_only]
trainer = "torchtitan"
world_size = 1
source = "{repo}"
ref = "comment-only"
args = ["--training.local-batch-size=2"]
[setups.rope_theta]
trainer = "torchtitan"
world_size = 1
source = "{repo}"
ref = "rope-theta"
args = ["--training.local-batch-size=2"]
[setups.grad_x2]
trainer = "torchtitan"
world_size = 1
source = "{repo}"
ref = "grad-x2"
args = ["--training.local-batch-size=2"]
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}).stdout.strip()


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A git repository holding the installed torchtitan at `main`, plus three branches: one that changes
    only a comment, one that changes the debug model's RoPE theta (a numerics change with no parameter),
    and one that doubles every gradient (a wrong gradient divide factor)."""
    repo = tmp_path_factory.mktemp("titan-src")
    shutil.copytree(Path(titan.__file__).parent, repo / "torchtitan", ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "torchtitan as installed")
    model = repo / "torchtitan" / "models" / "llama3" / "__init__.py"
    text = model.read_text()
    assert text.count("theta=500000,") >= 1  # the edit below must change something

    _git(repo, "checkout", "-q", "-b", "comment-only")
    model.write_text("# a comment: no numerics change\n" + text)
    _git(repo, "commit", "-q", "-am", "comment")
    _git(repo, "checkout", "-q", "main")
    _git(repo, "checkout", "-q", "-b", "rope-theta")
    model.write_text(text.replace("theta=500000,", "theta=10000,", 1))
    _git(repo, "commit", "-q", "-am", "rope theta")
    _git(repo, "checkout", "-q", "main")
    _git(repo, "checkout", "-q", "-b", "grad-x2")
    trainer = repo / "torchtitan" / "trainer.py"
    code = trainer.read_text()
    clip = '        with sl.log_trace_span("optim"):\n'
    assert code.count(clip) == 1
    double = "            for p in (p for m in self.model_parts for p in m.parameters() if p.grad is not None):\n" \
             "                p.grad.mul_(2)\n"
    trainer.write_text(code.replace(clip, clip + double))
    _git(repo, "commit", "-q", "-am", "gradients doubled")
    _git(repo, "checkout", "-q", "main")
    return repo


def _case(tmp_path: Path, text: str, name: str = "titan_refs"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_case(path)


def test_command_flags_cpu_and_cuda(tmp_path):
    case = _case(tmp_path, CASE.replace("source = \"{repo}\"\n", "").replace("ref = ", "# ref = "))
    s = case.setups[0]
    cpu = torchtitan.command_for(s, "cpu", tmp_path, None, deterministic=True)
    cuda = torchtitan.command_for(s, "cuda", tmp_path, None, deterministic=True)
    assert "parity.trainers.titan_cpu" in cpu["argv"] and "parity.trainers.titan_cpu" not in cuda["argv"]
    assert "torchtitan.train" in cuda["argv"]
    assert "--debug.deterministic" in cuda["argv"] and "--debug.deterministic" not in cpu["argv"]
    for argv in (cpu["argv"], cuda["argv"]):
        assert "--training.steps={steps}" in argv and "--debug.seed={seed}" in argv  # filled in per run
        assert "--training.seq-len={seq_len}" in argv  # given in [train]
        assert not any(a.startswith("--training.global-batch-size") for a in argv)  # not given: torchtitan's own
        assert argv[-len(s.external["args"]):] == s.external["args"]  # the setup's own flags come last and win
    assert cpu["metrics"]["loss"] == "loss_metrics/global_avg_loss"


@needs_titan  # the key holds the installed torchtitan's version
def test_seed_key_follows_model_and_seed_not_layout(tmp_path):
    case = _case(tmp_path, CASE.replace("source = \"{repo}\"\n", "").replace("ref = ", "# ref = "))
    a, b = case.setups[0], case.setups[2]
    assert a.external["args"] == b.external["args"]
    key = torchtitan.seed_key(a, "cpu", "assets")
    hsdp = replace(a, external={**a.external, "args": ["--parallelism.data-parallel-replicate-degree=2",
                                                        "--training.local-batch-size=2"]})
    assert torchtitan.seed_key(hsdp, "cpu", "assets") == key  # every layout of the case loads the same seed
    assert torchtitan.seed_key(replace(a, train=replace(a.train, seed=7)), "cpu", "assets") != key
    assert torchtitan.seed_key(a, "cuda", "assets") != key
    assert torchtitan.seed_key(a, "cpu", "other assets") != key
    other = replace(a, external={**a.external, "config": "llama3_debugmodel_flex"})
    assert torchtitan.seed_key(other, "cpu", "assets") != key


LIVE_CASE = """description = "a source tree run as its files are, and the same tree at a commit"
[train]
steps = 2
[setups.live]
trainer = "torchtitan"
world_size = 1
source = "{tree}"
[setups.at_main]
trainer = "torchtitan"
world_size = 1
source = "{tree}"
ref = "main"
"""


def _titan_tree(path: Path, git: bool) -> Path:
    """A torchtitan-shaped folder (all the case loader checks for), a git repository or not."""
    (path / "torchtitan").mkdir(parents=True)
    (path / "torchtitan" / "__init__.py").write_text("theta = 500000\n")
    (path / ".gitignore").write_text("*.log\n")
    if git:
        _git(path, "init", "-q", "-b", "main")
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", "tree")
    return path


def test_seed_key_of_a_source_tree_without_ref_sees_every_edit(tmp_path):
    """The seed is keyed by the files that run: each edit, an untracked module, a link's target and a deleted
    file change the key; an ignored file and what a link points at do not; the committed files again give
    the first key again. With ref, the commit stays the key."""
    tree = _titan_tree(tmp_path / "titan", git=True)
    live, at_main = _case(tmp_path, LIVE_CASE.format(tree=tree), "live").setups
    key = lambda setup=live: torchtitan.seed_key(setup, "cpu", "assets")
    init, extra, link = tree / "torchtitan" / "__init__.py", tree / "torchtitan" / "extra.py", tree / "torchtitan" / "lnk"
    outside = tmp_path / "outside.py"
    outside.write_text("a = 1\n")
    committed, main = key(), key(at_main)
    keys = [committed]

    def changed():
        keys.append(key())

    init.write_text("theta = 10000\n")  # two edits of one tracked file: two keys (both were "<HEAD>-dirty")
    changed()
    init.write_text("theta = 20000\n")
    changed()
    extra.write_text("y = 1\n")  # an untracked file
    changed()
    link.symlink_to(outside)
    changed()
    outside.write_text("a = 2\n")  # out of the tree: a link is hashed by its target string, never followed
    assert key() == keys[-1]
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere.py")
    changed()
    (tree / "train.log").write_text("ignored by .gitignore\n")
    assert key() == keys[-1]
    (tree / ".gitignore").unlink()  # a tracked file deleted (and train.log no longer ignored)
    changed()
    assert len(set(keys)) == len(keys), keys
    assert key(at_main) == main  # with ref, the commit is the key whatever the working tree holds

    _git(tree, "checkout", "-q", "--", ".")
    extra.unlink()
    link.unlink()
    assert key() == committed  # content, not history: the committed files again (train.log ignored again)
    recorded = torchtitan.identity(live)
    assert recorded["torchtitan_tree_sha256"] == torchtitan.tree_sha256(tree)
    assert recorded["torchtitan_commit"] == _git(tree, "rev-parse", "HEAD")


def test_seed_key_of_a_source_tree_that_is_not_a_git_repository(tmp_path):
    tree = _titan_tree(tmp_path / "titan", git=False)
    live = _case(tmp_path, LIVE_CASE.format(tree=tree).split("[setups.at_main]")[0]
                 + '[setups.b]\ntrainer = "torchtitan"\nworld_size = 1\n', "plain").setups[0]
    first = torchtitan.seed_key(live, "cpu", "assets")
    (tree / "torchtitan" / "__pycache__").mkdir()
    (tree / "torchtitan" / "__pycache__" / "x.cpython-311.pyc.12345").write_bytes(b"\0half-written bytecode")
    (tree / "torchtitan" / "old.pyc").write_bytes(b"\0bytecode")
    assert torchtitan.seed_key(live, "cpu", "assets") == first  # Python's own cache is not code
    (tree / "torchtitan" / "__init__.py").write_text("theta = 10000\n")
    assert torchtitan.seed_key(live, "cpu", "assets") != first
    assert torchtitan.identity(live)["torchtitan_commit"] == "not a git tree"


@pytest.mark.slow
@needs_titan
def test_an_edit_to_a_source_tree_without_ref_builds_a_fresh_seed(tmp_path, source_tree):
    """torchtitan itself, twice: the seed of an edited tree comes from the cache until the edit changes
    (both edits were "<HEAD>-dirty" to the old key)."""
    case = _case(tmp_path, LIVE_CASE.format(tree=source_tree), "live")
    cache = tmp_path / "cache"
    model = source_tree / "torchtitan" / "models" / "llama3" / "__init__.py"
    text = model.read_text()
    try:
        model.write_text(text + "# one uncommitted edit\n")
        first = torchtitan.seed_checkpoint(case, "cpu", cache, timeout_s=600)
        assert torchtitan.seed_checkpoint(case, "cpu", cache, timeout_s=600) == first
        model.write_text(text + "# another uncommitted edit\n")
        edited = torchtitan.seed_checkpoint(case, "cpu", cache, timeout_s=600)
    finally:
        model.write_text(text)  # the module's other tests read this tree
    assert len(list((cache / "keys").iterdir())) == 2  # built again, under its own key
    assert edited.sha256 == first.sha256  # a comment changes no weight, and the build is deterministic


@pytest.mark.slow
@needs_titan
def test_two_refs_of_a_source_tree(tmp_path, source_tree):
    """loss_compare's workflow as a case: a comment-only commit matches main bitwise; a RoPE change is
    caught at step 1 on the loss; doubled gradients at step 1 on the grad norm, by exactly x2."""
    from parity.verdict.case_verdict import compare_case
    from parity.run.runner import run_case

    case = _case(tmp_path, CASE.format(repo=source_tree))
    results = run_case(case, tmp_path / "out", "cpu", timeout_s=600, cache=tmp_path / "cache")
    assert {n: r.status for n, r in results.items()} == dict.fromkeys(("main", "comment_only", "rope_theta", "grad_x2"),
                                                                      "ok"), {n: r.message for n, r in results.items()}
    verdict = compare_case(case, tmp_path / "out")
    same, changed, doubled = verdict.pairs
    assert same.passed, same.problems
    for metric in ("loss", "grad_norm"):
        assert same.metrics[metric].exact_equal_steps == 2
    assert same.metrics["weights"].exact_equal_steps == same.metrics["weights"].n > 0
    assert not changed.passed
    assert (changed.diverged["metric"], changed.diverged["step"]) == ("loss", 1)
    d = doubled.diverged
    assert (d["metric"], d["step"], d["value_other"] / d["value_ref"]) == ("grad_norm", 1, 2.0)
    first_loss = doubled.metrics["loss"].first_not_bitwise
    assert first_loss is None or first_loss["step"] > 1  # the loss at step 1 is computed before any gradient
    from parity.core.records import read_json

    runs = {s.name: read_json(tmp_path / "out" / case.name / s.name / "run.json") for s in case.setups}
    commits = {n: r["torchtitan_commit"] for n, r in runs.items()}
    assert len(set(commits.values())) == 4 and commits["main"] == _git(source_tree, "rev-parse", "main")
    assert _git(source_tree, "status", "--porcelain") == ""  # the user's tree is read, never written


def test_without_the_extra_a_torchtitan_case_cannot_run_and_says_how_to_install(tmp_path, monkeypatch):
    """The plugin skips (or with --parity-strict fails) on this DeviceError; the CLI exits 2 with it."""
    import importlib.util

    from parity.run.runner import DeviceError, resolve_device

    case = _case(tmp_path, CASE.replace("source = \"{repo}\"\n", "").replace("ref = ", "# ref = "))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchtitan" else real(name, *a))
    with pytest.raises(DeviceError, match=r'torchtitan not installed; install with: pip install "parity\[torchtitan\]"'):
        resolve_device("cpu", case)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert resolve_device("cpu", case) == "cpu"
