"""One run session, the flow `parity run` (parity.cli), the pytest items (parity.plugin) and `parity calibrate`
share: prepare the run directory, run the plan, judge each case.

Preparing checks the run directory, resolves every case's seed checkpoint before anything is written,
marks the directory and takes every case's lock; running is parity.run.runner.run_suite; judging compares the setups
(parity.verdict.case_verdict), checks the stored baselines (parity.verdict.baselines) and writes
verdict.json and, as the update mode allows, baselines.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

from parity.case.schema import Case
from parity.core.errors import InputError, one_line
from parity.core.paths import inside
from parity.core.process import LaunchResult
from parity.core.rundir import case_lock, check_out, claim, prepare_out
from parity.run.launch.nodes import NODE_LOGS
from parity.run.runner import RunOptions, run_suite, seed_or_none
from parity.verdict import baselines
from parity.verdict.case_verdict import compare_case, load_runs, unjudged_verdict, with_baselines, write_verdict
from parity.verdict.model import Verdict

Results = dict[str, dict[str, LaunchResult]]  # {case: {setup: how its run ended}}


class RunSession:
    """Cases run into one run directory `out`, judged against the baseline root `baselines` with the
    update mode `update` (None: baselines are only read)."""

    def __init__(self, out: Path, options: RunOptions = RunOptions(), baselines: Path | None = None,
                 update: str | None = None):
        self.out, self.options, self.baselines, self.update = Path(out), options, baselines, update

    @contextmanager
    def running(self, cases: list[Case], devices: dict[str, str], commands: dict | None = None) -> Iterator[Results]:
        """Prepare, then run the cases on their resolved `devices`; yields how every setup's run ended while
        every case's lock is still held, so that what ran is judged before another process may replace it.
        `commands`: per case name, the command that reproduces its run."""
        check_out(self.out)
        # Every seed checkpoint is checked before the run directory is written.
        opts = self.options
        seeds = {c.name: seed_or_none(c, opts.cache, devices[c.name], opts.timeout_s) for c in cases}
        self.out = prepare_out(self.out)
        if opts.leader is not None:
            claim(self.out, NODE_LOGS)  # the other nodes write their logs there
        with ExitStack() as locks:
            for case in cases:
                locks.enter_context(case_lock(self.out, case.name))
            yield run_suite(cases, self.out, devices, opts, seeds, commands)

    def run(self, cases: list[Case], devices: dict[str, str], commands: dict | None = None) -> Results:
        """running(), with nothing judged while the locks are held."""
        with self.running(cases, devices, commands) as results:
            return results

    def judge(self, case: Case) -> Verdict:
        """judge_run() of a case this session ran."""
        return judge_run(case, self.out, self.baselines, self.update)

    def judge_locked(self, case: Case) -> Verdict:
        """judge(), under the case's lock: for a case whose run ended earlier and is judged on its own."""
        with case_lock(self.out, case.name):
            return self.judge(case)


def judge(case: Case, run_dir: Path, baseline_root: Path, update: str | None) -> Verdict:
    """The verdict between setups first, then the baselines, written to verdict.json.

    A baseline is written (as `update` allows) only from a case that passed: a run whose setups
    disagree, or whose reference is nondeterministic, is no reference for anyone.
    """
    if not inside(run_dir, case.name).is_dir():
        raise InputError(f"{run_dir}: no run of case {case.name} here ({Path(run_dir) / case.name} is not a directory)")
    runs = load_runs(case, run_dir)  # read once, for both checks
    between_setups = compare_case(case, run_dir, runs=runs)  # judged once; baselines are added to it
    passed = between_setups.passed
    checks = baselines.check_case_baselines(case, run_dir, baseline_root, update if passed else None, runs,
                                           between_setups.pairs)
    if update and not passed:
        for b in checks:
            b.message += (f"; --update-baselines={update} wrote nothing: the case failed, and only a passing "
                             "case makes a baseline")
    return _written(run_dir, with_baselines(between_setups, checks))


def judge_run(case: Case, out: Path, baseline_root: Path, update: str | None) -> Verdict:
    """judge() for a case this process has just run. Once training has begun, a problem found while judging
    (a record or baseline file that cannot be read, a disk that refuses a write) fails this case with one line
    in its verdict, and the other cases of the suite are still judged and reported."""
    try:
        return judge(case, out, baseline_root, update)
    except (InputError, OSError) as e:
        return _written(out, unjudged_verdict(case, f"not judged: {one_line(e)}"))


def _written(run_dir: Path, verdict: Verdict) -> Verdict:
    """The verdict, written to verdict.json; where the disk refuses, the verdict fails and says so."""
    try:
        write_verdict(run_dir, verdict)
    except OSError as e:
        problem = f"verdict.json not written: {one_line(e)}"
        return replace(verdict, passed=False, problems=verdict.problems + [problem])
    return verdict

