"""parity installed into a fresh virtual environment, used from a user's repository outside this checkout.

The venv sees this interpreter's site-packages through a plain path line in a .pth file (torch is
not installed again), and parity itself goes in as a real, non-editable install built from a copy
of the sources. The user's repository configures parity in its pyproject.toml and runs the
documented command, `pytest --pyargs parity`.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from parity.core import records
from parity.core.reproduce import PYTEST
from test_config import CASE as TWIN_CASE  # two identical single-process setups, the smallest case

REPO = Path(__file__).resolve().parent.parent

PYPROJECT = """
[project]
name = "my-trainer"
version = "0"

[tool.parity]
cases = "tests/parity/cases"
baselines = "tests/parity/baselines"
out = "reports/parity"
device = "cpu"
"""


def installed_venv(tmp_path: Path) -> Path:
    """A venv with parity installed (non-editable) from a copy of this checkout's sources; returns its python."""
    src = tmp_path / "src"  # built from a copy: pip builds in tree and would leave build/ in the checkout
    shutil.copytree(REPO / "parity", src / "parity", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # A plain path line: the outer site-packages joins sys.path, but its own .pth files (the
    # editable install's finder among them) are not run, so `parity` can only come from this venv.
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
                   check=True, capture_output=True, env=clean_env(tmp_path))
    return python


def clean_env(tmp_path: Path, seed_cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout must not be importable
    env["PIP_CACHE_DIR"] = str(tmp_path / "pip-cache")
    if seed_cache is not None:
        env["PARITY_CACHE"] = str(seed_cache)
    return env


def user_repo(root: Path) -> Path:
    (root / "tests" / "parity" / "cases").mkdir(parents=True)
    (root / "tests" / "parity" / "baselines").mkdir()
    (root / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (root / "tests" / "parity" / "cases" / "small.toml").write_text(TWIN_CASE)
    return root


@pytest.mark.slow
def test_installed_parity_runs_the_users_cases_from_their_repository(tmp_path, seed_cache):
    python = installed_venv(tmp_path)
    repo = user_repo(tmp_path / "my-trainer")
    env = clean_env(tmp_path, seed_cache)

    def run(args, cwd=repo):
        return subprocess.run([str(python), "-m", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)

    origin = subprocess.run([str(python), "-c", "import parity; print(parity.__file__)"], cwd=repo,
                            capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert Path(origin).is_relative_to(tmp_path / "venv"), origin

    # First run: the case has no stored baseline yet (a missing one fails), so it writes them.
    first = run([*PYTEST, "-p", "no:cacheprovider", "--parity-update-baselines=new"])  # python -m pytest --pyargs parity
    assert first.returncode == 0 and "1 passed" in first.stdout, first.stdout + first.stderr
    out = repo / "reports" / "parity"
    assert (out / "report.md").is_file() and f"parity report: {out / 'report.md'}" in first.stdout
    assert sorted(p.name for p in (repo / "tests" / "parity" / "baselines" / "small").iterdir()) == [
        "a.cpu.csv", "b.cpu.csv"]

    # The command run.json records reproduces the case from the user's repository (pytest is this
    # venv's, run as `python -m pytest`), now against the baselines the first run stored.
    command = records.read_json(out / "small" / "b" / "run.json")["command"]
    assert command[0] == "pytest", command
    again = run(["pytest", *command[1:], "-p", "no:cacheprovider"], cwd=repo / "tests")
    assert again.returncode == 0 and "1 passed" in again.stdout, again.stdout + again.stderr
    verdict = records.read_json(out / "small" / "verdict.json")
    assert verdict["passed"] and {b["status"] for b in verdict["baselines"]} == {"match"}
