"""pytest plugin (entry point `parity`): `pytest parity -m 8gpu` runs every case as one test item
(`pytest --pyargs parity -m 8gpu` from a repository that has parity installed and its own cases).

Items come from parity/test_parity.py, parametrized over the case files. This module declares the
options and the markers; at configure time it registers a CasePlugin, kept in config.stash, which
holds the session's settings, cases, GPU pool (shared by xdist workers) and run session, and
implements the hooks that need them, through to the end-of-session report.
Importing it must stay cheap (no torch): pytest loads it in every session of this environment.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from parity.config import DEVICES, INI_PREFIX, Settings, ini_settings, layered, project_settings
from parity.core.errors import InputError
from parity.case.markers import marker_docs, markers_for
from parity.options import STEPS, TIMEOUT, UPDATE_HELP, UPDATE_METAVAR, UPDATE_MODES, WRITES_MISSING, names_a_path
from parity.run.gpupool import GpuPool, pool_dir, visible_gpu_ids
from parity.trainers import TRAINERS, load_cases

if TYPE_CHECKING:  # for the annotations only: judging loads the verdict package when a case runs
    from parity.verdict.model import Verdict


def pytest_addoption(parser):
    group = parser.getgroup("parity", "numerics parity cases")
    group.addoption("--parity-device", choices=DEVICES, default=None,
                    help="auto: CUDA when enough GPUs are visible for a case, else CPU with gloo ranks "
                         "(default: parity_device or [tool.parity] device, else auto)")
    group.addoption("--parity-out", default=None,
                    help="run directory for case outputs and the report (default: parity_out or [tool.parity] out, "
                         "else <rootdir>/reports/runs/pytest)")
    group.addoption("--parity-update-baselines", nargs="?", const="failing", default=None, type=_mode_or_path,
                    metavar=UPDATE_METAVAR, help=UPDATE_HELP)
    group.addoption("--parity-steps", type=STEPS, default=None, help="override every case's step count")
    group.addoption("--parity-timeout", type=TIMEOUT, default=900.0, help="seconds per torchrun launch before its ranks are killed")
    group.addoption("--parity-strict", action="store_true",
                    help="fail instead of skip when --parity-device cuda has too few GPUs or a case cannot run on the device")
    group.addoption("--parity-repeat", action="store_const", const=True, dest="parity_repeat", default=None,
                    help="run each case's reference twice and compare bitwise first (default: on for CUDA, off for CPU, "
                         "unless the case says [expect] repeat)")
    group.addoption("--parity-no-repeat", action="store_const", const=False, dest="parity_repeat",
                    help="never run the repeat check")
    group.addoption("--parity-cases", default=None,
                    help="directory of case files (default: parity_cases or [tool.parity] cases, else <rootdir>/cases)")
    group.addoption("--parity-baselines", default=None,
                    help="baseline root (default: parity_baselines or [tool.parity] baselines, else <rootdir>/baselines)")
    for key, what in (("cases", "directory of case files"), ("baselines", "baseline root"),
                      ("out", "run directory"), ("device", "auto, cpu or cuda")):
        parser.addini(INI_PREFIX + key, f"parity: {what} (paths relative to this ini file)", default=None)


class _SwallowedArg(str):
    """A word argparse took as the mode of a bare --parity-update-baselines; it was meant as a path."""


def _mode_or_path(value: str) -> str:
    return value if value in UPDATE_MODES else _SwallowedArg(value)


def _give_back_swallowed_arg(config) -> None:
    """`pytest --parity-update-baselines parity` means mode "failing" and the path `parity`, as the CLI reads it."""
    value = config.getoption("parity_update_baselines")
    if not isinstance(value, _SwallowedArg):
        return
    if not names_a_path(value, config.invocation_params.dir):
        raise pytest.UsageError(f"--parity-update-baselines: {value!r} is neither a mode "
                                f"({', '.join(UPDATE_MODES)}) nor an existing path")
    config.option.parity_update_baselines = "failing"
    given = config.args_source == pytest.Config.ArgsSource.ARGS
    config.args[:] = [*config.args, str(value)] if given else [str(value)]


def pytest_configure(config):
    _give_back_swallowed_arg(config)
    plugin = CasePlugin(config)  # a bad [tool.parity] or parity ini key stops the session now (exit 4)
    config.stash[PLUGIN] = plugin
    config.pluginmanager.register(plugin, CasePlugin.name)
    for name, doc in marker_docs(TRAINERS).items():
        config.addinivalue_line("markers", f"{name}: {doc}")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist controller: tell each worker whether whole shares reach it (see pytest_xdist_make_scheduler)."""
    node.workerinput["parity_shares"] = node.config.getvalue("dist") == "load"


def run_and_judge(case, config) -> tuple[dict, str]:
    """Run the case (with the cases planned alongside it, on its first item) and judge it as the CLI would;
    returns (verdict, failure message)."""
    return config.stash[PLUGIN].run_and_judge(case)


class CasePlugin:
    """The parity side of one pytest process (the session, or one xdist worker): its settings and cases,
    read once; the GPU pool; the run session; which cases ran; and the hooks that use them."""

    name = "parity-cases"

    def __init__(self, config):
        self.config = config
        self.settings = parity_settings(config)
        self.worker = getattr(config, "workerinput", None)
        self.pool = None
        if self.worker is not None and self.settings.device != "cpu":
            # xdist workers share every visible GPU through one pool; a case takes what it needs or waits.
            ids = visible_gpu_ids()
            if ids:
                self.pool = GpuPool(pool_dir(self.worker["testrunuid"]), ids)
        self.loaded: list | None = None  # the cases, once read
        self.selected: list[str] | None = None  # the case items left after selection
        self.done: dict[str, Exception | None] = {}  # case run (or left out): None, or why its device cannot run it
        self.any_ran = False  # whether a case item ran in this session: xdist's controller sees its workers' too
        self.report: tuple[Path, Path] | None = None

    def cases(self) -> list:
        """The session's cases, validated with their stored baselines; loaded once per process (token files
        are read in full): session start, collection and the summary share them."""
        if self.loaded is None:
            self.loaded = load_parity_cases(self.config, self.settings)
        return self.loaded

    @pytest.hookimpl(tryfirst=True)  # before xdist starts its workers
    def pytest_sessionstart(self, session):
        """Check every case file before any test runs; then clear outputs an earlier session left behind."""
        if self.worker is not None or not _collects_cases(self.config):
            return
        self.cases()  # a bad case stops the session here, as a usage error (exit 4)
        try:
            check_outputs(self.config, self.settings)
        except InputError as e:
            raise pytest.UsageError(f"parity: {e}") from None

    def pytest_generate_tests(self, metafunc):
        if "parity_case" not in metafunc.fixturenames:
            return
        params = []
        for case in self.cases():
            marks = [getattr(pytest.mark, m) for m in markers_for(case)] + [pytest.mark.parity_case, pytest.mark.slow]
            params.append(pytest.param(case, id=case.name, marks=marks))
        metafunc.parametrize("parity_case", params)

    def pytest_collection_finish(self, session):
        """The case items left after -m / -k / node-id selection: the ones a worker may plan together."""
        self.selected = [item.callspec.params["parity_case"].name for item in session.items
                         if "parity_case" in getattr(getattr(item, "callspec", None), "params", {})]

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config, log):
        """Under `-n N` with xdist's default distribution, every case item of one share (parity.run.plan.shares)
        goes to the same worker, which plans that share together; other tests are dealt out one by one."""
        if config.getvalue("dist") != "load":
            return None
        from xdist.scheduler import LoadScopeScheduling

        shares = self.shares

        class ShareScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                name = nodeid.rpartition("::test_case[")[2][:-1] if nodeid.endswith("]") else None
                # numnodes: the workers asked for (-n), as each worker counts them (workercount). The live
                # nodes shrink as workers finish, and a share counted over fewer would be one nobody holds.
                share = shares(self.numnodes).get(name) if "test_parity.py::" in nodeid else None
                return nodeid if share is None else f"parity-share-{share}"

        return ShareScheduling(config, log)

    def shares(self, workers: int) -> dict[str, int]:
        from parity.run.plan import shares

        return shares(self.cases(), workers)

    def share_of(self, case) -> list:
        """The cases this process plans together with `case`: every selected one without xdist; under
        xdist its share when the scheduler keeps shares whole, else the case alone."""
        selected = set(self.selected if self.selected is not None else [case.name]) | {case.name}
        cases = [c for c in self.cases() if c.name in selected]
        if self.worker is None:
            return cases
        if not self.worker.get("parity_shares"):
            return [case]
        share = self.shares(self.worker["workercount"])
        return [c for c in cases if share[c.name] == share[case.name]]

    def run_share(self, case) -> None:
        """Run the setups of `case` and of every case planned with it (once per process); a case whose
        device cannot run it is left out, to be skipped (or failed, with --parity-strict) by its own item."""
        from parity.case.schema import BackendError
        from parity.core.reproduce import pytest_case
        from parity.run.runner import DeviceError, resolve_device

        if case.name in self.done:
            return
        share = [c for c in self.share_of(case) if c.name not in self.done]
        devices, commands = {}, {}
        for c in share:
            try:
                devices[c.name] = resolve_device(self.settings.device, c, len(self.pool.ids) if self.pool else None)
            except (DeviceError, BackendError) as e:
                self.done[c.name] = e
                continue
            commands[c.name] = pytest_case(c.name, *self.reproduce_args())
        self.run_session.run([c for c in share if c.name in devices], devices, commands)
        self.done.update(dict.fromkeys(devices, None))

    def reproduce_args(self) -> list[str]:
        """The pytest options that reproduce a case's run; paths given on the command line are not in the
        configuration the command will read, so they are passed on, relative to the repository root where
        they lie inside it (parity.core.reproduce)."""
        from parity.core.provenance import project_root
        from parity.core.reproduce import root_relative

        option = self.config.getoption
        steps, repeat = option("parity_steps"), option("parity_repeat")
        root = project_root(Path.cwd())
        return ([f"--{o.replace('_', '-')}={root_relative(option(o), root)}"
                 for o in ("parity_cases", "parity_baselines") if option(o)]
                + ["--parity-device", self.settings.device]
                + (["--parity-steps", str(steps)] if steps else [])
                + ([] if repeat is None else ["--parity-repeat" if repeat else "--parity-no-repeat"]))

    @cached_property
    def run_session(self):
        """This process's run session: one plan file per xdist worker, GPUs from the pool."""
        from parity.run.runner import RunOptions
        from parity.session import RunSession

        option = self.config.getoption
        pool = self.pool

        def gpus(world_size, device):
            return pool.acquire(world_size) if pool and device == "cuda" else nullcontext(None)

        options = RunOptions(steps=option("parity_steps"), timeout_s=option("parity_timeout"),
                             repeat=option("parity_repeat"), gpus=gpus,
                             plan_file=f"plan-{self.worker['workerid']}.json" if self.worker else "plan.json")
        return RunSession(self.settings.out, options, self.settings.baselines, option("parity_update_baselines"))

    def run_and_judge(self, case) -> tuple[Verdict, str]:
        """run_share(case), then its verdict under its lock; returns (verdict, failure message)."""
        self.run_share(case)
        problem = self.done[case.name]
        if problem is not None:  # its device cannot run it
            if self.config.getoption("parity_strict"):
                pytest.fail(str(problem), pytrace=False)
            pytest.skip(str(problem))
        verdict = self.run_session.judge_locked(case)
        return verdict, "" if verdict.passed else _failure_message(case, verdict, self.settings.out)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and "test_parity.py::test_case[" in report.nodeid:
            self.any_ran = True

    def pytest_sessionfinish(self, session):
        if self.worker is not None:
            return  # workers share the run directory; the controller writes one merged report
        if not self.any_ran:
            return  # an earlier session's verdicts in --parity-out are not this session's to report
        out = self.settings.out
        if not any(out.glob("*/verdict.json")) if out.is_dir() else True:
            return
        from parity.report.pages import write_report

        self.report = write_report(out)

    def pytest_terminal_summary(self, terminalreporter):
        if self.report is None:
            return  # no case ran in this session (or this is an xdist worker)
        from parity.verdict.baselines import unused_baselines
        from parity.verdict.formatting import device_counts

        terminalreporter.write_line(f"parity report: {self.report[0]}  {self.report[1]}")
        lines, counts = device_counts(self.settings.out)
        for line in lines:
            terminalreporter.write_line(f"parity: {line}")
        terminalreporter.write_line(f"parity: cases per device: {counts}")
        for path in unused_baselines(self.settings.baselines, self.cases()):
            terminalreporter.write_line(f"parity: unused baseline {path}: its case or setup no longer exists")


PLUGIN = pytest.StashKey[CasePlugin]()


def parity_settings(config) -> Settings:
    """This session's cases, baselines, out and device: the command line, else the ini keys, else the
    [tool.parity] table of the nearest pyproject.toml at or above the rootdir, else the defaults."""
    def option(name):
        value = config.getoption(name)
        return None if value is None else Path(value)

    root = config.rootpath
    given = Settings(option("parity_cases"), option("parity_baselines"), option("parity_out"),
                     config.getoption("parity_device"))
    defaults = Settings(root / "cases", root / "baselines", root / "reports" / "runs" / "pytest", "auto")
    updating = _updating(config)
    try:
        return layered(given, ini_settings(config.getini, config.inipath, root, updating),
                       project_settings(root, updating), defaults)
    except InputError as e:
        raise pytest.UsageError(f"parity: {e}") from None


def _updating(config) -> bool:
    """Whether this session may write a missing baseline (--parity-update-baselines, a mode other than drift):
    then a missing configured baselines folder is created by the first baseline the run writes, not refused."""
    mode = config.getoption("parity_update_baselines")
    return mode in WRITES_MISSING or isinstance(mode, _SwallowedArg)  # a bare flag before a path: "failing"


def setting_source(config, key: str) -> str:
    """Where this session's `key` (cases, baselines, out) came from, for a message: the option, the ini
    key, the [tool.parity] table, or the default."""
    if config.getoption(f"parity_{key}") is not None:
        return f"--parity-{key}"
    updating = _updating(config)
    if getattr(ini_settings(config.getini, config.inipath, config.rootpath, updating), key) is not None:
        return f"{config.inipath or '-o'}: {INI_PREFIX}{key}"
    if getattr(project_settings(config.rootpath, updating), key) is not None:
        return f"[tool.parity] {key}"
    return f"the default {key}"


def load_parity_cases(config, settings: Settings) -> list:
    """The session's cases, validated with their stored baselines; bad input is a pytest usage error."""
    from parity.verdict.baselines import check_case_files

    if not settings.cases.is_dir():
        raise pytest.UsageError(f"parity: cases folder {settings.cases} is not a directory (--parity-cases, "
                                "parity_cases or [tool.parity] cases); allowed: a directory of case files")
    try:
        # A folder that is missing or holds no case file is a mistake (a typo in --parity-cases), not zero cases.
        cases = load_cases([settings.cases])
        for case in cases:
            check_case_files(case, settings.baselines, config.getoption("parity_update_baselines"))
    except InputError as e:
        raise pytest.UsageError(f"parity: {e}") from None
    return cases


def check_outputs(config, settings: Settings) -> None:
    """The environment, --parity-out and the baseline root, checked before anything runs; then the outputs
    an earlier session left in --parity-out cleared."""
    from parity.core.paths import check_writable_dir
    from parity.core.process import omp_threads
    from parity.core.rundir import check_apart, check_out, clear_earlier_outputs

    out, baselines = settings.out, settings.baselines
    out_from, baselines_from = setting_source(config, "out"), setting_source(config, "baselines")
    omp_threads()
    check_apart(out, baselines, out_from, baselines_from)
    check_out(out, out_from)  # a folder holding other work is refused before anything is written
    if config.getoption("parity_update_baselines"):  # found now, not after the training it would have stored
        check_writable_dir(baselines, baselines_from)
    clear_earlier_outputs(out)  # only what an earlier parity session wrote there


def _collects_cases(config) -> bool:
    """Whether this session's arguments reach parity/test_parity.py (so `pytest tests/x.py` skips the checks)."""
    module = Path(__file__).with_name("test_parity.py").resolve()
    for arg in config.args:
        target = arg.split("::")[0]
        if config.option.pyargs and target in ("parity", "parity.test_parity"):
            return True
        path = (config.invocation_params.dir / target).resolve()
        if module == path or module.is_relative_to(path):
            return True
    return False


def _failure_message(case, verdict, out: Path) -> str:
    from parity.verdict.formatting import divergence_table, ran_on

    # The table already lists every problem line; add only the files a reviewer opens next.
    lines = [f"parity case {case.name} failed on {ran_on(verdict)} ({case.path})",
             divergence_table(verdict)]
    lines += [f"obtained: {b.obtained}" for b in verdict.baselines if not b.passed and b.obtained]
    try:
        from parity.report.curves import plot_case
        from parity.report.heatmap import plot_probes
        from parity.report.model import load_case_run

        records = load_case_run(out, case.name)  # read once, for both figures
        png, _ = plot_case(out, case.name, records)
        lines.append(f"plot: {png}")
        probes = plot_probes(out, case.name, records)
        if probes and probes.png:
            lines.append(f"probes heatmap: {probes.png}")
    except Exception as e:  # noqa: BLE001 - a plotting failure must not hide the verdict
        lines.append(f"plot: not drawn ({type(e).__name__}: {e})")
    lines.append(f"run directory: {out / case.name}")
    return "\n".join(lines)
