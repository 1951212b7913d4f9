"""pytest plugin (entry point `parity`): `pytest parity -m 8gpu` runs every case as one test item
(`pytest --pyargs parity -m 8gpu` from a repository that has parity installed and its own cases).

Items come from parity/test_parity.py, parametrized over the case files; this module owns the
options, the markers, the GPU pool shared by xdist workers and the end-of-session report.
Importing it must stay cheap (no torch): pytest loads it in every session of this environment.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from pathlib import Path

import pytest

from parity.run.gpupool import GpuPool, pool_dir, visible_gpu_ids

WORLD_MARKERS = {1: "1gpu", 2: "2gpu", 4: "4gpu", 8: "8gpu"}
MARKERS = {
    "cpu": "case runs on CPU with gloo ranks (SDPA math or flash; the CPU build has no efficient or cudnn kernel)",
    "1gpu": "largest setup needs 1 rank",
    "2gpu": "largest setup needs 2 ranks",
    "4gpu": "largest setup needs 3-4 ranks",
    "8gpu": "largest setup needs 5-8 ranks",
    "multinode": "largest setup needs more than 8 ranks",
    "parity_case": "a parity case (one item per cases/*.toml)",
    "torchtitan": "case runs torchtitan's own trainer (needs the torchtitan extra: pip install \"parity[torchtitan]\")",
    "command": "case runs a setup through its own training command (trainer = \"command\")",
}
def markers_for(case) -> list[str]:
    from parity.case.spec import attention_problem

    names = []
    if all(attention_problem(case, s, "cpu") is None for s in case.setups):
        names.append("cpu")
    names.append(next((m for n, m in WORLD_MARKERS.items() if case.world_size <= n), "multinode"))
    names += sorted({s.trainer for s in case.setups} - {"builtin"})
    return names


def pytest_addoption(parser):
    from parity.cli import STEPS, TIMEOUT  # one parser per value, shared with the command line
    from parity.config import DEVICES, INI_PREFIX

    g = parser.getgroup("parity", "numerics parity cases")
    g.addoption("--parity-device", choices=DEVICES, default=None,
                help="auto: CUDA when enough GPUs are visible for a case, else CPU with gloo ranks "
                     "(default: parity_device or [tool.parity] device, else auto)")
    g.addoption("--parity-out", default=None,
                help="run directory for case outputs and the report (default: parity_out or [tool.parity] out, "
                     "else <rootdir>/reports/runs/pytest)")
    g.addoption("--parity-update-baselines", nargs="?", const="failing", default=None, type=_mode_or_path,
                metavar="{failing,new,all}", help="write baselines: failing (default when given), new, all")
    g.addoption("--parity-steps", type=STEPS, default=None, help="override every case's step count")
    g.addoption("--parity-timeout", type=TIMEOUT, default=900.0, help="seconds per torchrun launch before its ranks are killed")
    g.addoption("--parity-strict", action="store_true",
                help="fail instead of skip when --parity-device cuda has too few GPUs or a case cannot run on the device")
    g.addoption("--parity-repeat", action="store_const", const=True, dest="parity_repeat", default=None,
                help="run each case's reference twice and compare bitwise first (default: on for CUDA, off for CPU, "
                     "unless the case says [expect] repeat)")
    g.addoption("--parity-no-repeat", action="store_const", const=False, dest="parity_repeat",
                help="never run the repeat check")
    g.addoption("--parity-cases", default=None,
                help="directory of case files (default: parity_cases or [tool.parity] cases, else <rootdir>/cases)")
    g.addoption("--parity-baselines", default=None,
                help="baseline root (default: parity_baselines or [tool.parity] baselines, else <rootdir>/baselines)")
    for key, what in (("cases", "directory of case files"), ("baselines", "baseline root"),
                      ("out", "run directory"), ("device", "auto, cpu or cuda")):
        parser.addini(INI_PREFIX + key, f"parity: {what} (paths relative to this ini file)", default=None)


class _SwallowedArg(str):
    """A word argparse took as the mode of a bare --parity-update-baselines; it was meant as a path."""


def _mode_or_path(value: str) -> str:
    from parity.cli import UPDATE_MODES

    return value if value in UPDATE_MODES else _SwallowedArg(value)


def _give_back_swallowed_arg(config) -> None:
    """`pytest --parity-update-baselines parity` means mode "failing" and the path `parity`, as the CLI reads it."""
    value = config.getoption("parity_update_baselines")
    if not isinstance(value, _SwallowedArg):
        return
    from parity.cli import UPDATE_MODES, names_a_path

    if not names_a_path(value, config.invocation_params.dir):
        raise pytest.UsageError(f"--parity-update-baselines: {value!r} is neither a mode "
                                f"({', '.join(UPDATE_MODES)}) nor an existing path")
    config.option.parity_update_baselines = "failing"
    given = config.args_source == pytest.Config.ArgsSource.ARGS
    config.args[:] = [*config.args, str(value)] if given else [str(value)]


def pytest_configure(config):
    _give_back_swallowed_arg(config)
    config.pluginmanager.register(_CasesRan(), _CasesRan.name)
    parity_settings(config)  # a bad [tool.parity] or parity ini key stops the session now (exit 4)
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    worker = getattr(config, "workerinput", None)
    config._parity_gpu_pool = None
    if worker is not None and parity_settings(config).device != "cpu":
        # xdist workers share every visible GPU through one pool; a case takes what it needs or waits.
        ids = visible_gpu_ids()
        if ids:
            config._parity_gpu_pool = GpuPool(pool_dir(worker["testrunuid"]), ids)


def parity_settings(config):
    """This session's cases, baselines, out and device: the command line, else the ini keys, else the
    [tool.parity] table of the nearest pyproject.toml at or above the rootdir, else the defaults."""
    cached = getattr(config, "_parity_settings", None)
    if cached is not None:
        return cached
    from parity.config import Settings, ini_settings, layered, project_settings
    from parity.core.errors import InputError

    def option(name):
        value = config.getoption(name)
        return None if value is None else Path(value)

    root = config.rootpath
    given = Settings(option("parity_cases"), option("parity_baselines"), option("parity_out"),
                     config.getoption("parity_device"))
    defaults = Settings(root / "cases", root / "baselines", root / "reports" / "runs" / "pytest", "auto")
    try:
        settings = layered(given, ini_settings(config.getini, config.inipath, root), project_settings(root), defaults)
    except InputError as e:
        raise pytest.UsageError(f"parity: {e}") from None
    config._parity_settings = settings
    return settings


def setting_source(config, key: str) -> str:
    """Where this session's `key` (cases, baselines, out) came from, for a message: the option, the ini
    key, the [tool.parity] table, or the default."""
    from parity.config import INI_PREFIX, ini_settings, project_settings

    if config.getoption(f"parity_{key}") is not None:
        return f"--parity-{key}"
    if getattr(ini_settings(config.getini, config.inipath, config.rootpath), key) is not None:
        return f"{config.inipath or '-o'}: {INI_PREFIX}{key}"
    if getattr(project_settings(config.rootpath), key) is not None:
        return f"[tool.parity] {key}"
    return f"the default {key}"


def parity_paths(config) -> tuple[Path, Path, Path]:
    settings = parity_settings(config)
    return settings.cases, settings.baselines, settings.out


def load_parity_cases(config):
    """The session's cases, validated with their stored baselines; bad input is a pytest usage error.

    Loaded once per process (token files are read in full): session start, collection and the
    summary share the result.
    """
    cached = getattr(config, "_parity_cases", None)
    if cached is not None:
        return cached
    from parity.verdict.baselines import check_case_files
    from parity.core.errors import InputError
    from parity.case.spec import load_cases

    cases_dir, baseline_root, _ = parity_paths(config)
    if not cases_dir.is_dir():
        raise pytest.UsageError(f"parity: cases folder {cases_dir} is not a directory (--parity-cases, parity_cases "
                                "or [tool.parity] cases); allowed: a directory of case files")
    try:
        # A folder that is missing or holds no case file is a mistake (a typo in --parity-cases), not zero cases.
        cases = load_cases([cases_dir])
        for case in cases:
            check_case_files(case, baseline_root, config.getoption("parity_update_baselines"))
    except InputError as e:
        raise pytest.UsageError(f"parity: {e}") from None
    config._parity_cases = cases
    return cases


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


@pytest.hookimpl(tryfirst=True)  # before xdist starts its workers
def pytest_sessionstart(session):
    """Check every case file before any test runs; then clear outputs an earlier session left behind."""
    config = session.config
    if getattr(config, "workerinput", None) is not None:
        return
    if not _collects_cases(config):
        return
    load_parity_cases(config)  # a bad case stops the session here, as a usage error (exit 4)
    from parity.core.errors import InputError
    from parity.core.process import omp_threads
    from parity.core.paths import check_writable_dir
    from parity.core.rundir import check_apart, check_out, clear_earlier_outputs

    _, baselines, out = parity_paths(config)
    out_from, baselines_from = setting_source(config, "out"), setting_source(config, "baselines")
    try:
        omp_threads()  # the environment, checked before anything runs
        check_apart(out, baselines, out_from, baselines_from)
        check_out(out, out_from)  # a folder holding other work is refused before anything is written
        if config.getoption("parity_update_baselines"):  # found now, not after the training it would have stored
            check_writable_dir(baselines, baselines_from)
        clear_earlier_outputs(out)  # only what an earlier parity session wrote there
    except InputError as e:
        raise pytest.UsageError(f"parity: {e}") from None


def pytest_generate_tests(metafunc):
    if "parity_case" not in metafunc.fixturenames:
        return
    params = []
    for case in load_parity_cases(metafunc.config):
        marks = [getattr(pytest.mark, m) for m in markers_for(case)] + [pytest.mark.parity_case]
        params.append(pytest.param(case, id=case.name, marks=marks))
    metafunc.parametrize("parity_case", params)


def pytest_collection_finish(session):
    """The case items left after -m / -k / node-id selection: the ones a worker may plan together."""
    session.config._parity_selected = [item.callspec.params["parity_case"].name for item in session.items
                                       if "parity_case" in getattr(getattr(item, "callspec", None), "params", {})]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist controller: tell each worker whether whole shares reach it (see pytest_xdist_make_scheduler)."""
    node.workerinput["parity_shares"] = node.config.getvalue("dist") == "load"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `-n N` with xdist's default distribution, every case item of one share (parity.run.plan.shares)
    goes to the same worker, which plans that share together; other tests are dealt out one by one."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ShareScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            name = nodeid.rpartition("::test_case[")[2][:-1] if nodeid.endswith("]") else None
            share = _shares(config, len(self.nodes)).get(name) if "test_parity.py::" in nodeid else None
            return nodeid if share is None else f"parity-share-{share}"

    return ShareScheduling(config, log)


def _shares(config, workers: int) -> dict[str, int]:
    from parity.run.plan import shares

    return shares(load_parity_cases(config), workers)


def _share_of(case, config) -> list:
    """The cases this process plans together with `case`: every selected one without xdist; under
    xdist its share when the scheduler keeps shares whole, else the case alone."""
    selected = set(getattr(config, "_parity_selected", [case.name])) | {case.name}
    cases = [c for c in load_parity_cases(config) if c.name in selected]
    worker = getattr(config, "workerinput", None)
    if worker is None:
        return cases
    if not worker.get("parity_shares"):
        return [case]
    share = _shares(config, worker["workercount"])
    return [c for c in cases if share[c.name] == share[case.name]]


def _run_share(case, config) -> None:
    """Run the setups of `case` and of every case planned with it (once per process); a case whose
    device cannot run it is left out, to be skipped (or failed, with --parity-strict) by its own item."""
    from parity.core.reproduce import pytest_case
    from parity.core.rundir import case_lock, prepare_out
    from parity.run.runner import DeviceError, resolve_device, run_suite, seed_or_none
    from parity.case.spec import BackendError

    done = config.__dict__.setdefault("_parity_done", {})
    if case.name in done:
        return
    _, _, out = parity_paths(config)
    device = parity_settings(config).device
    pool = config._parity_gpu_pool
    steps, repeat, timeout = (config.getoption(k) for k in ("parity_steps", "parity_repeat", "parity_timeout"))
    share = [c for c in _share_of(case, config) if c.name not in done]
    devices, commands = {}, {}
    # Paths given on the command line are not in the configuration the command will read: pass them on.
    given_paths = [f"--{o.replace('_', '-')}={Path(config.getoption(o)).resolve()}"
                   for o in ("parity_cases", "parity_baselines") if config.getoption(o)]
    for c in share:
        try:
            devices[c.name] = resolve_device(device, c, len(pool.ids) if pool else None)
        except (DeviceError, BackendError) as e:
            done[c.name] = e
            continue
        commands[c.name] = pytest_case(c.name, *given_paths, "--parity-device", device)
        commands[c.name] += ["--parity-steps", str(steps)] if steps else []
        commands[c.name] += [] if repeat is None else ["--parity-repeat" if repeat else "--parity-no-repeat"]
    share = [c for c in share if c.name in devices]
    seeds = {c.name: seed_or_none(c, None, devices[c.name], timeout) for c in share}
    out = prepare_out(out)
    worker = getattr(config, "workerinput", None)
    plan_file = f"plan-{worker['workerid']}.json" if worker else "plan.json"

    def gpus(world_size, device):
        return pool.acquire(world_size) if pool and device == "cuda" else nullcontext(None)

    with ExitStack() as locks:
        for c in share:
            locks.enter_context(case_lock(out, c.name))
        run_suite(share, out, devices, steps, timeout, None, None, commands, repeat, seeds, gpus=gpus,
                  plan_file=plan_file)
    done.update(dict.fromkeys(devices, None))


def run_and_judge(case, config) -> tuple[dict, str]:
    """Run the case (with the cases planned alongside it, on its first item) and judge it as the CLI would;
    returns (verdict, failure message)."""
    from parity.core.rundir import case_lock
    from parity.run.runner import judge_run

    _run_share(case, config)
    problem = config._parity_done[case.name]
    if problem is not None:  # its device cannot run it
        if config.getoption("parity_strict"):
            pytest.fail(str(problem), pytrace=False)
        pytest.skip(str(problem))
    _, baseline_root, out = parity_paths(config)
    with case_lock(out, case.name):
        verdict = judge_run(case, out, baseline_root, config.getoption("parity_update_baselines"))
    message = ""
    if not verdict["passed"]:
        message = _failure_message(case, verdict, out)
    return verdict, message


def _failure_message(case, verdict, out: Path) -> str:
    from parity.verdict import compare

    # The table already lists every problem line; add only the files a reviewer opens next.
    lines = [f"parity case {case.name} failed on {compare.ran_on(verdict)} ({case.path})",
             compare.divergence_table(verdict)]
    lines += [f"obtained: {b['obtained']}" for b in verdict["baselines"] if not b["passed"] and b.get("obtained")]
    try:
        from parity.report.curves import plot_case
        from parity.report.heatmap import plot_probes
        from parity.report.model import load_case_run

        records = load_case_run(out, case.name)  # read once, for both figures
        png, _ = plot_case(out, case.name, records)
        lines.append(f"plot: {png}")
        probes = plot_probes(out, case.name, records)
        if probes:
            lines.append(f"probes heatmap: {probes[0]}")
    except Exception as e:  # noqa: BLE001 - a plotting failure must not hide the verdict
        lines.append(f"plot: not drawn ({type(e).__name__}: {e})")
    lines.append(f"run directory: {out / case.name}")
    return "\n".join(lines)


class _CasesRan:
    """Whether a case item ran in this session: xdist's controller sees its workers' reports here too."""

    name = "parity-cases-ran"

    def __init__(self):
        self.any = False

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and "test_parity.py::test_case[" in report.nodeid:
            self.any = True


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if getattr(config, "workerinput", None) is not None:
        return  # workers share the run directory; the controller writes one merged report
    if not config.pluginmanager.get_plugin(_CasesRan.name).any:
        return  # an earlier session's verdicts in --parity-out are not this session's to report
    _, _, out = parity_paths(config)
    if not any(out.glob("*/verdict.json")) if out.is_dir() else True:
        return
    from parity.report.pages import write_report

    md, html = write_report(out)
    config._parity_report = (md, html)


def pytest_terminal_summary(terminalreporter, config):
    report = getattr(config, "_parity_report", None)
    if report is None:
        return  # no case ran in this session (or this is an xdist worker)
    terminalreporter.write_line(f"parity report: {report[0]}  {report[1]}")
    from parity.verdict.compare import device_counts

    _, _, out = parity_paths(config)
    lines, counts = device_counts(out)
    for line in lines:
        terminalreporter.write_line(f"parity: {line}")
    terminalreporter.write_line(f"parity: cases per device: {counts}")
    from parity.verdict.baselines import unused_baselines

    _, baseline_root, _ = parity_paths(config)
    for path in unused_baselines(baseline_root, load_parity_cases(config)):
        terminalreporter.write_line(f"parity: unused baseline {path}: its case or setup no longer exists")
