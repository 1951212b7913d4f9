"""The code that runs inside ranks records numbers: it loads nothing that judges, reports, launches,
drives a run or runs another trainer."""

import pkgutil
import subprocess
import sys

import parity.rank

# Every package a rank must not load (parity.session: the run session, where it exists).
NOT_IN_A_RANK = ("parity.verdict", "parity.report", "parity.run", "parity.trainers", "parity.cli", "parity.plugin",
                 "parity.session", "parity.calibrate", "parity.config")
# The rank entry and its train loop, and every other module of parity.rank. The entry module itself,
# parity.rank.__main__, starts training when imported; it imports parity.core.lifeline and parity.rank.train.
RANK_MODULES = ["parity.rank", "parity.rank.train"] + sorted(
    f"parity.rank.{m.name}" for m in pkgutil.iter_modules(parity.rank.__path__) if m.name not in ("__main__", "train"))


def loaded_after_importing(modules) -> set[str]:
    """The parity modules in sys.modules of a fresh interpreter after importing `modules`."""
    code = (f"import sys\nimport {', '.join(modules)}\n"
            "print(' '.join(m for m in sys.modules if m == 'parity' or m.startswith('parity.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_rank_modules_load_no_verdict_report_run_trainers_or_front_end():
    loaded = loaded_after_importing(RANK_MODULES)
    assert {"parity.rank.train", "parity.rank.faults", "parity.core.lifeline"} <= loaded
    forbidden = sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in NOT_IN_A_RANK))
    assert forbidden == [], f"a rank loads {forbidden}"


def test_importing_the_rank_package_loads_only_itself():
    """parity.rank stays import-light: the entry module arms its parent-death guard before anything slow."""
    assert loaded_after_importing(["parity.rank"]) == {"parity", "parity.rank"}
