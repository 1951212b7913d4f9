"""Command-line words go where the user meant them: a bare --update-baselines never swallows a path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.cli import bare_flag_default, parser
from parity.options import UPDATE_MODES

REPO = Path(__file__).resolve().parent.parent


CASE = "cases/replicate_vs_hsdp.toml"


@pytest.mark.parametrize("argv, expected", [
    (["run", "--update-baselines", CASE], ["run", "--update-baselines=failing", CASE]),
    (["run", CASE, "--update-baselines"], ["run", CASE, "--update-baselines=failing"]),
    (["run", "--update-baselines", "--steps", "2", CASE], ["run", "--update-baselines=failing", "--steps", "2", CASE]),
    (["run", "--update-baselines", "new", CASE], ["run", "--update-baselines", "new", CASE]),
    (["run", "--update-baselines=all", CASE], ["run", "--update-baselines=all", CASE]),
    (["run", CASE, "--update-baselines", "bogus"], ["run", CASE, "--update-baselines", "bogus"]),  # argparse names it
])
def test_bare_flag_takes_its_default_and_leaves_the_next_word(argv, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    assert bare_flag_default(argv, "--update-baselines", UPDATE_MODES, "failing") == expected


def test_cli_run_keeps_the_case_after_a_bare_update_flag(monkeypatch):
    monkeypatch.chdir(REPO)
    argv = bare_flag_default(["run", "--update-baselines", "cases/replicate_vs_hsdp.toml"], "--update-baselines",
                             UPDATE_MODES, "failing")
    args = parser().parse_args(argv)
    assert args.cases == ["cases/replicate_vs_hsdp.toml"] and args.update_baselines == "failing"


def _pytest(*words):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *words],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_pytest_keeps_the_path_after_a_bare_update_flag():
    proc = _pytest("--parity-update-baselines", "tests/test_spec.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = _pytest("--co", "tests/test_spec.py")
    assert proc.stdout.splitlines()[-1].split(" passed")[0] == collected.stdout.splitlines()[-1].split(" test")[0]


def test_pytest_rejects_a_word_that_is_neither_mode_nor_path():
    proc = _pytest("--parity-update-baselines", "bogus")
    assert proc.returncode == 4
    assert "--parity-update-baselines: 'bogus' is neither a mode (failing, new, all, drift) nor an existing path" in proc.stderr


def test_a_reader_that_stops_early_ends_the_command_without_a_traceback(tmp_path):
    """`parity list | head -1`: the pipe closes before parity writes; it ends as a SIGPIPE'd program would."""
    import signal

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    done = subprocess.run([sys.executable, "-m", "parity.cli", "list"], cwd=REPO, stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
