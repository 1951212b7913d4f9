import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from trained_together import cases_of, train_once

# What the fast tier (`pytest -m "not slow"`) may not start: torchrun, which starts ranks. A test that runs the `parity` command
# in a process of its own stays in it when that command stops before launching anything (bad input): its time says
# so (`--durations`); one that trains is marked slow.
LAUNCHES = ("torchrun", "torch.distributed.run")


def _launches(args) -> bool:
    words = args if isinstance(args, (str, bytes)) else " ".join(str(a) for a in args)
    return any(w in str(words) for w in LAUNCHES)


@pytest.fixture(autouse=True)
def fast_tier_starts_no_ranks(request, monkeypatch):
    """A test not marked `slow` that starts torchrun or a rank fails at once, naming the marker it needs: the fast
    tier stays a seconds-to-minutes inner loop, and no launching test lands in it by accident."""
    if request.node.get_closest_marker("slow"):
        return
    real = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if _launches(args):
            pytest.fail(f"{request.node.nodeid} starts {args!r}: mark it @pytest.mark.slow", pytrace=False)
        real(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


def session_dir(tmp_path_factory, name: str) -> Path:
    """A folder of this test session that its pytest-xdist workers share (each worker's temp folder lies in the
    session's); without xdist, one in the session's temp folder."""
    base = tmp_path_factory.getbasetemp()
    d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def seed_cache(tmp_path_factory) -> Path:
    """One seed-checkpoint cache for the whole test session, away from the user's cache; shared by xdist workers,
    as parity's cache is by concurrent runs (a builder that finds a seed another one finished uses it)."""
    return session_dir(tmp_path_factory, "seed-cache")


@pytest.fixture(scope="session")
def trained_together(request, tmp_path_factory, seed_cache):
    """{case name: tests/trained_together.Trained}: the TRAINED_TOGETHER cases of every module whose selected tests
    read this fixture, trained once for the session as one suite (one launch per world size), whichever
    xdist worker needs them first."""
    return train_once(cases_of(request.session.items), session_dir(tmp_path_factory, "together"), seed_cache)


@pytest.fixture
def write_case(tmp_path):
    """Write a case file from TOML text; returns its path (the file stem is the case name)."""

    def write(text: str, name: str = "case") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        return path

    return write
