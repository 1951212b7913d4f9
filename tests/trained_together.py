"""Small trainings that several test modules read, run as one suite for the whole test session.

A test module lists its cases in TRAINED_TOGETHER ({case name: case text}) and reads them through the
`trained_together` fixture (tests/conftest.py). Every such case of the session's selected tests goes to one
parity.run.runner.run_suite: the planner gives them one torchrun launch per world size and trains a setup that
two cases share once. Each module then pays for its own trainings, but neither for a torchrun start-up of its
own (process start, imports and process group: 5 to 25 s a launch on 2 shared cores) nor for another module's
identical setups. Running one module alone trains its cases alone. Under pytest-xdist the first worker that
needs them trains the cases of all the selected tests (a worker collects every test, whichever it runs), and
the others wait for it and read what it trained.
"""

from __future__ import annotations

import fcntl
import pickle
from dataclasses import dataclass
from pathlib import Path

from parity.case.loader import load_case
from parity.case.schema import Case
from parity.core import records
from parity.core.process import LaunchResult
from parity.run.runner import RunOptions, run_suite

# The training the float32 cases share, so that a setup two modules both need is one training: the smallest
# that still gives every layout something to split (a sequence of 16 over tp 2; a global batch of 4 over data
# parallel 4, or over data parallel 2 and two microbatches), and step 3, the first after the 2-step warmup.
TRAIN = """
[train]
model = "tiny"
steps = 3
global_batch = 4
seq_len = 16
"""
# Steps 1 and 2 probed: step 3, never probed, shows that probes change nothing they do not record.
PROBES = """
[probes]
steps = [1, 2]
"""


@dataclass(frozen=True)
class Trained:
    """One case of the shared suite: its records lie under out / case.name / setup."""

    case: Case
    out: Path
    results: dict[str, LaunchResult]

    def dir(self, setup: str) -> Path:
        return self.out / self.case.name / setup


def cases_of(items) -> dict[str, str]:
    """{case name: text} of every module that a test among `items` reads through the fixture; one name, one text."""
    texts: dict[str, str] = {}
    for module in dict.fromkeys(item.module for item in items if "trained_together" in item.fixturenames):
        for name, text in module.TRAINED_TOGETHER.items():
            assert texts.setdefault(name, text) == text, f"two modules declare case {name!r} differently"
    return texts


def train_together(texts: dict[str, str], d: Path, seed_cache: Path) -> dict[str, Trained]:
    """Every case in one run_suite, in name order: the setups of a launch train in that order, so a module can
    know which of its setups runs first in a fresh process (tests/test_setups.py relies on it)."""
    cases = []
    for name in sorted(texts):
        (d / f"{name}.toml").write_text(texts[name])
        cases.append(load_case(d / f"{name}.toml"))
    out = d / "out"
    results = run_suite(cases, out, {c.name: "cpu" for c in cases}, RunOptions(cache=seed_cache, timeout_s=600))
    return {c.name: Trained(c, out, results[c.name]) for c in cases}


def train_once(texts: dict[str, str], d: Path, seed_cache: Path) -> dict[str, Trained]:
    """train_together into `d`, once for every process that asks (pytest-xdist workers): the first trains under
    an exclusive lock and leaves what it trained in `d`; the others wait on the lock and read it. A first one
    that failed leaves nothing, and the next tries again."""
    done = d / "trained.pickle"
    with open(d / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        if done.is_file():
            trained = pickle.loads(done.read_bytes())
            assert set(trained) == set(texts), "workers selected different trained-together cases"
            return trained
        trained = train_together(texts, d, seed_cache)
        with records.atomic_open(done, "wb") as f:
            pickle.dump(trained, f)
        return trained
