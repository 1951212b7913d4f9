"""Provenance: a run records the commit of the code under test (the repository it was started from, not
parity's own checkout), parity's version apart from it, and commands with paths relative to the repository root."""

from __future__ import annotations

import importlib.metadata
import subprocess
import textwrap
from pathlib import Path

import pytest

from parity import cli
from parity.config import layered, project_settings
from parity.core import provenance, records
from parity.core.reproduce import root_relative, shareable
from parity.run import runner
from parity.trainers import load_case
from parity.trainers.seed_cache import SeedBuildError

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
CASE = """
description = "two setups, never trained here: the seed checkpoint fails to build"
[train]
model = "tiny"
steps = 2
global_batch = 4
seq_len = 16
[setups.replicate]
dp_api = "replicate"
dp_replicate = 2
[setups.hsdp]
dp_api = "fully_shard"
dp_replicate = 2
dp_shard = 1
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A user's repository with one commit: a [tool.parity] table, a case and a tracked source file."""
    # git must not find a repository above tmp_path (the "not a git repository" test relies on it too).
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    root = tmp_path / "trainer"
    (root / "tests" / "parity" / "cases").mkdir(parents=True)
    (root / "tests" / "parity" / "baselines").mkdir()
    (root / "pyproject.toml").write_text('[tool.parity]\ncases = "tests/parity/cases"\n'
                                         'baselines = "tests/parity/baselines"\nout = "reports/parity"\n')
    (root / "tests" / "parity" / "cases" / "pair.toml").write_text(textwrap.dedent(CASE))
    (root / "model.py").write_text("SCALE = 1.0\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root


def test_the_commit_is_the_repository_the_run_started_from(repo, monkeypatch):
    monkeypatch.chdir(repo / "tests")  # anywhere in the repository
    origin = provenance.run_origin(Path.cwd())
    assert origin["git_commit"] == git(repo, "rev-parse", "HEAD")
    assert origin["parity_version"] == importlib.metadata.version("parity")
    # parity's own checkout, recorded apart (this test runs from one).
    assert origin["parity_commit"] and origin["parity_commit"].split("-")[0] != origin["git_commit"]


def test_an_edited_tracked_file_is_dirty_and_the_run_directory_is_not(repo):
    head = git(repo, "rev-parse", "HEAD")
    (repo / "scratch.txt").write_text("untracked: not code under test until added\n")
    assert provenance.code_commit(repo) == head
    out = repo / "reports" / "parity"
    out.mkdir(parents=True)
    (out / "kept.txt").write_text("a tracked output\n")
    git(repo, "add", "reports")
    git(repo, "commit", "-qm", "an output")
    head = git(repo, "rev-parse", "HEAD")
    (out / "kept.txt").write_text("rewritten by the run\n")
    assert provenance.code_commit(repo, outputs=(out,)) == head
    assert provenance.code_commit(repo) == f"{head}-dirty"  # an output only where the run says so
    (repo / "model.py").write_text("SCALE = 2.0\n")
    assert provenance.code_commit(repo, outputs=(out,)) == f"{head}-dirty"


def test_outside_a_repository_it_says_so(repo):
    assert provenance.code_commit(repo.parent) == provenance.NOT_A_REPOSITORY
    assert provenance.project_root(repo.parent) == repo.parent.resolve()
    assert provenance.project_root(repo / "tests") == repo.resolve()


def test_a_run_records_the_code_under_test_and_parity_apart(repo, monkeypatch):
    """Through the runner (the seed checkpoint fails to build, so no torchrun starts): every run.json, and so
    every baseline made from one, says which commit of the user's repository ran."""
    monkeypatch.chdir(repo)
    (repo / "model.py").write_text("SCALE = 2.0\n")

    def unbuildable(*_args, **_kwargs):
        raise SeedBuildError("no seed here")

    monkeypatch.setattr(runner, "seed_for", unbuildable)
    case = load_case(repo / "tests" / "parity" / "cases" / "pair.toml")
    out = repo / "reports" / "parity"
    results = runner.run_case(case, out, "cpu")
    assert {r.status for r in results.values()} == {"failed"}
    run = records.read_json(out / "pair" / "hsdp" / "run.json")
    assert run["git_commit"] == git(repo, "rev-parse", "HEAD") + "-dirty"
    assert run["parity_version"] == importlib.metadata.version("parity")
    assert run["parity_commit"] != run["git_commit"]


def test_the_recorded_command_is_relative_to_the_repository_root(repo, monkeypatch, tmp_path):
    """[tool.parity] paths are absolute once read; run.json's command names them from the repository root."""
    monkeypatch.chdir(repo / "tests")
    settings = layered(project_settings(Path.cwd()), cli.DEFAULTS)
    args = cli.parser(settings).parse_args(["run", "parity/cases/pair.toml", "pair", "--device", "cpu"])
    argv = cli.run_argv(args, provenance.project_root(Path.cwd()))
    assert argv == ["parity", "run", "tests/parity/cases/pair.toml", "pair", "--device", "cpu",
                    "--out", "reports/parity", "--baselines", "tests/parity/baselines"]
    # An --out outside the repository stays absolute in the record (it is where the run wrote).
    args = cli.parser(settings).parse_args(["run", "--out", str(tmp_path / "elsewhere")])
    argv = cli.run_argv(args, provenance.project_root(Path.cwd()))
    assert argv[2] == "tests/parity/cases" and argv[argv.index("--out") + 1] == str(tmp_path / "elsewhere")
    assert cli.run_argv(args)[2] == str(repo / "tests" / "parity" / "cases")  # the SLURM job's: as given


def test_shareable_commands_name_no_folder_outside_the_repository(repo, tmp_path):
    cases = repo / "tests" / "parity" / "cases"
    assert root_relative(cases, repo) == "tests/parity/cases" and root_relative(repo, repo) == "."
    assert root_relative(tmp_path / "x", repo) == str(tmp_path / "x")
    recorded = ["pytest", "--pyargs", "parity.test_parity::test_case[pair]", f"--parity-cases={cases}",
                f"--parity-out={tmp_path / 'o'}", "--parity-device", "cpu"]
    assert shareable(recorded, repo) == ["pytest", "--pyargs", "parity.test_parity::test_case[pair]",
                                         "--parity-cases=tests/parity/cases", "--parity-device", "cpu"]
    recorded = ["parity", "run", str(cases / "pair.toml"), "--out", str(tmp_path / "o"), "--steps", "2"]
    assert shareable(recorded, repo) == ["parity", "run", "tests/parity/cases/pair.toml", "--steps", "2"]
    assert shareable(["parity", "run", "pair", "--out", str(repo / "runs")], repo) == [
        "parity", "run", "pair", "--out", "runs"]
