"""The test tiers: `pytest -m "not slow"` is the fast inner loop, and nothing that starts ranks lands in it unmarked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _launches

from parity.run.launch.torchrun import torchrun_argv

REPO = Path(__file__).resolve().parent.parent


def test_an_unmarked_test_that_starts_torchrun_fails_at_once_naming_the_marker():
    with pytest.raises(pytest.fail.Exception, match=r"starts .*torch.distributed.run.*: mark it @pytest.mark.slow"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True)


def test_the_launch_parity_makes_is_what_the_guard_stops_and_a_short_tool_is_not():
    assert _launches(torchrun_argv(2, Path("plan.json")))
    assert _launches("torchrun --nproc-per-node=2 -m parity.rank plan.json")
    assert not _launches(["git", "rev-parse", "HEAD"])
    assert not _launches([sys.executable, "-m", "parity", "list"])  # the command alone, stopping before a launch


@pytest.mark.slow
def test_a_slow_test_may_start_torchrun():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "nproc" in done.stdout


def test_every_case_item_is_slow():
    """The case items train: the fast tier selects none of them, and a plain collection has one per case."""
    def collected(*marker: str) -> list[str]:
        done = subprocess.run([sys.executable, "-m", "pytest", "parity", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *marker], cwd=REPO, capture_output=True, text=True, timeout=120)
        return [line for line in done.stdout.splitlines() if "::test_case[" in line]

    cases = sorted(p.stem for p in (REPO / "cases").glob("*.toml"))
    assert [line.split("[")[1].rstrip("]") for line in collected()] == cases
    assert collected("-m", "not slow") == []
