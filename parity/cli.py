"""The `parity` command line: each subcommand parses its arguments, checks what only the command line knows
(flags that go together, where --out and --baselines came from), calls the library and prints.

Exit codes: 0 every expectation held, 1 one failed (or a run crashed), 2 bad input.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

from parity.core import records
from parity.config import DEVICES, Settings, layered, project_settings
from parity.core.errors import InputError
from parity.core.process import DEFAULT_TIMEOUT_S
from parity.core.paths import inside
from parity.core.provenance import project_root
from parity.core.reproduce import root_relative
from parity.options import (STEPS, TIMEOUT, UPDATE_HELP, UPDATE_METAVAR, UPDATE_MODES, WRITES_MISSING, names_a_path,
                            positive)
from parity.run.plan import PLANS
from parity.case.markers import markers_for
from parity.case.names import case_name_arg, close_names, did_you_mean, names_a_case, resolve_case_arg
from parity.trainers import load_cases

# parity.report.evidence.FORMATS, spelt out: importing that module here would load matplotlib for every command.
EVIDENCE_FORMATS = ("mermaid", "png")

# Used where neither the command line nor [tool.parity] (parity.config) says otherwise; relative
# to the current directory.
DEFAULTS = Settings(cases=Path("cases"), baselines=Path("baselines"), out=Path("reports/runs/latest"), device="auto")


class UsageError(InputError):
    """Bad input found by the CLI itself: printed as one line, exit 2."""


def _load_cases(args, baseline_root: str | None = None, update: str | None = None):
    """args.cases, each a path or a case name in the cases folder (parity.case.names), every case validated
    (and, with a baseline root, its stored baselines readable) before anything runs."""
    cases = load_cases([resolve_case_arg(arg, args.cases_dir) for arg in args.cases])
    if baseline_root is not None:
        from parity.verdict.baselines import check_case_files

        for case in cases:
            check_case_files(case, Path(baseline_root), update)
    return cases


TABLE_STEPS, TABLE_HEAD, TABLE_TAIL = 40, 10, 5  # a longer run's table shows its first and last steps


MARKS = {"bitwise": "=", "tolerance": "≈", "beyond": "≠"}


def step_table(case, run_dir: Path) -> str:
    """Side by side: step, then loss and grad norm of every setup, the reference's column named so, each other
    value marked against the reference's: '=' bitwise equal, '≈' within the case's tolerance, '≠' beyond it."""

    series = {}
    for s in case.setups:
        run = records.read_setup_run(records.setup_dir(run_dir, case.name, s.name), lenient=True)
        series[s.name] = {r["step"]: r for r in records.rows_of(run["metrics"] or {})}
    ref = case.reference.name
    steps = sorted({k for rows in series.values() for k in rows})
    header = ["step"]
    for metric in ("loss", "grad_norm"):
        header += [f"{metric}[{s.name}]" + (" (reference)" if s.name == ref else "") for s in case.setups]
    lines = [header]
    shown = steps if len(steps) <= TABLE_STEPS else steps[:TABLE_HEAD] + steps[-TABLE_TAIL:]
    for step in shown:
        if len(shown) < len(steps) and step == shown[TABLE_HEAD]:
            lines.append(["..."] + [""] * (len(header) - 1))
        row = [str(step)]
        for metric in ("loss", "grad_norm"):
            base = series[ref].get(step, {}).get(metric)
            for s in case.setups:
                v = series[s.name].get(step, {}).get(metric)
                cell = "-" if v is None else repr(v)
                if s.name != ref and v is not None:
                    cell += "  " + MARKS[_against(v, base, case.expect.tolerance[metric])]
                row.append(cell)
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines)
    text += f"\n(against {ref}'s value at the step: = bitwise equal, ≈ within tolerance, ≠ beyond tolerance)"
    if len(shown) < len(steps):
        text += (f"\n({len(shown)} of {len(steps)} steps shown; every step is in "
                 f"{records.setup_dir(run_dir, case.name, ref) / 'metrics.csv'} and each setup's own)")
    return text


def _against(value: float, base: float | None, tolerance) -> str:
    """How a value stands against the reference's: "bitwise", "tolerance" or "beyond" (NaN, Inf or a missing
    reference value are beyond)."""
    from parity.verdict.numbers import bitwise_equal  # the one equality rule: same 8 bytes, never NaN or Inf

    if base is None:
        return "beyond"
    if bitwise_equal(value, base):
        return "bitwise"
    finite = math.isfinite(value) and math.isfinite(base)
    return "tolerance" if finite and tolerance.allows(value, base) else "beyond"


def run_argv(args, root: Path | None = None) -> list[str]:
    """The `parity run` command line that args came from, in full: as given (the SLURM job's), or with `root`
    each path relative to it where it lies inside it (the reproduce command run.json records, run from the
    repository root; parity.core.reproduce). A case argument that names no path is a case name, kept."""
    def path(p) -> str:
        return str(p) if root is None else root_relative(p, root)

    # A path as parity.case.names.resolve_case_arg tells one: anything there (a case name is not).
    cases = [path(c) if root is not None and os.path.lexists(c) else str(c) for c in args.cases]
    argv = ["parity", "run", *cases, "--device", args.device, "--out", path(args.out)]
    argv += ["--steps", str(args.steps)] if args.steps else []
    argv += [] if args.repeat is None else ["--repeat" if args.repeat else "--no-repeat"]
    argv += ["--plan", args.plan] if args.plan != "suite" else []
    argv += ["--timeout", repr(args.timeout)] if args.timeout != DEFAULT_TIMEOUT_S else []
    argv += ["--baselines", path(args.baselines)] if str(args.baselines) != str(DEFAULTS.baselines) else []
    argv += [f"--update-baselines={args.update_baselines}"] if args.update_baselines else []
    argv += ["--no-report"] if args.no_report else []
    return argv


def cmd_run(args) -> int:
    from parity.run.launch.channel import env_secret
    from parity.run.launch.nodes import check_splits, digest, parse_nodes
    from parity.core.process import omp_threads
    from parity.core.paths import check_writable_dir
    from parity.core.rundir import check_apart, check_out
    from parity.run.runner import resolve_device, visible_gpus

    omp_threads()  # the environment, checked before anything runs
    check_apart(Path(args.out), Path(args.baselines), _source(args, "out"), _source(args, "baselines"))
    if args.update_baselines:  # found now, not after the training it would have stored
        check_writable_dir(Path(args.baselines), _source(args, "baselines"))
    if args.launcher == "slurm":
        return _submit_slurm(args)
    if args.submit:
        raise UsageError("--submit: allowed only with --launcher slurm")
    nodes = parse_nodes(args.nnodes, args.node_rank, args.rdzv_endpoint)
    secret = None if nodes is None else env_secret()  # checked before anything runs or is written
    cases = _load_cases(args, args.baselines, args.update_baselines)
    # Every case's device (GPU count, SDPA kernels), --out and seed checkpoint are checked before the
    # first case runs: bad input writes nothing.
    gpus = None if nodes is None else visible_gpus() * nodes.count  # a launch spreads its ranks over the nodes
    devices = {case.name: resolve_device(args.device, case, gpus) for case in cases}
    if nodes is None:
        return _run_here(args, cases, devices)
    check_splits(nodes.count, cases)
    agreed = digest([[c.name, c.sha256] for c in cases] + [devices, args.steps, args.repeat, args.plan, nodes.count])
    if not nodes.leads:
        from parity.run.launch.nodes import follow

        return follow(nodes, agreed, Path(args.out), args.timeout, secret)
    from parity.run.launch.nodes import Leader

    check_out(Path(args.out))  # node 0 writes the run's secret there before the others join
    leader = Leader(nodes, agreed, Path(args.out), args.timeout, secret)
    code = 1
    try:
        code = _run_here(args, cases, devices, leader)
    finally:
        leader.finish(code)  # the other nodes exit with node 0's code
    return code


def _source(args, key: str) -> str:
    """Where `parity run`'s --out or --baselines came from, for a message: the flag, or [tool.parity]."""
    if f"--{key}" not in args.given and getattr(args.project, key) is not None:
        return f"[tool.parity] {key}"
    return f"--{key}"


def _run_here(args, cases, devices, leader=None) -> int:
    """Run, judge and report the cases from this process (alone, or as node 0 of several)."""
    from parity.run.progress import Progress
    from parity.run.runner import RunOptions
    from parity.session import RunSession
    from parity.verdict.formatting import device_counts

    progress = Progress()
    command = run_argv(args, project_root(Path.cwd()))
    if leader is not None:
        command += ["--nnodes", str(args.nnodes), "--node-rank", "0", "--rdzv-endpoint", args.rdzv_endpoint]
    started = time.monotonic()

    def on_plan(text):
        nonlocal started
        started = time.monotonic()  # the progress line counts from the first launch
        print(text, flush=True)

    def on_progress(p, _setup_elapsed):
        progress.update(p["case"], p["setup"], p["step"], p["steps"], time.monotonic() - started)

    options = RunOptions(steps=args.steps, timeout_s=args.timeout, repeat=args.repeat, plan=args.plan,
                         on_progress=on_progress, on_plan=on_plan, leader=leader)
    session = RunSession(Path(args.out), options, Path(args.baselines), args.update_baselines)
    failed = False
    with session.running(cases, devices, {c.name: command for c in cases}) as results:
        progress.done()
        for case in cases:
            failed |= not _show_case(session, case, results[case.name])
    out = session.out
    print(f"\ncases per device: {device_counts(out, {c.name for c in cases})[1]}")
    if not args.no_report:
        from parity.report.pages import write_report

        md, html = write_report(out)
        print(f"\nreport: {md}  {html}")
    return 1 if failed else 0


def _show_case(session, case, results) -> bool:
    """Print how the case's setups ended, its step table and its verdict; returns whether it passed."""
    from parity.verdict.formatting import format_verdict

    for name, r in results.items():
        if r.status != "ok":
            print(f"{case.name}/{name}: {r.status}: {r.message}", file=sys.stderr)
    print(f"\n== {case.name} ({session.out / case.name}) ==")
    print(step_table(case, session.out))
    verdict = session.judge(case)
    print(format_verdict(verdict))
    return verdict.passed


def _submit_slurm(args) -> int:
    """--launcher slurm: print the job script, or with --submit write it into --out and sbatch it."""
    import shutil
    import subprocess

    from parity.run.launch.slurm import job_script
    from parity.core.rundir import claim, prepare_out

    if args.node_rank is not None or args.rdzv_endpoint is not None:
        raise UsageError("--launcher slurm: the job script sets --node-rank and --rdzv-endpoint on each node; "
                         "allowed: leave them out")
    cases = _load_cases(args, args.baselines, args.update_baselines)
    if args.nnodes > 1:
        from parity.run.launch.channel import env_secret
        from parity.run.launch.nodes import check_splits

        check_splits(args.nnodes, cases)
        env_secret()  # an operator's secret, which the job inherits, checked now rather than on the cluster
    script = job_script(run_argv(args)[2:], args.nnodes, max(c.world_size for c in cases), args.device, Path.cwd())
    if not args.submit:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise UsageError("--submit: sbatch is not on PATH; allowed: leave out --submit to print the job script")
    path = claim(prepare_out(Path(args.out)), "slurm-job.sh")
    records.atomic_write_text(path, script)
    done = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    print(f"{path}\n{done.stdout}{done.stderr}", end="")
    return 0 if done.returncode == 0 else 1


def cmd_list(args) -> int:
    cases = _load_cases(args)
    rows = [("case", "world size", "setups", "mode", "outcome", "markers")]
    for c in cases:
        rows.append((c.name, str(c.world_size), ", ".join(s.name for s in c.setups), c.expect.mode, c.expect.outcome,
                     " ".join(markers_for(c))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_compare(args) -> int:
    """Re-judge an existing run directory (e.g. one copied from a GPU cluster) without running anything."""
    from parity.session import judge
    from parity.verdict.formatting import format_verdict

    run_dir = _existing_dir(args.run_dir, "RUN_DIR")
    failed = False
    for case in _load_cases(args, args.baselines, args.update_baselines):
        verdict = judge(case, run_dir, Path(args.baselines), args.update_baselines)
        print(format_verdict(verdict))
        failed |= not verdict.passed
    return 1 if failed else 0


def cmd_locate(args) -> int:
    """Where each pair's probes first part, for an existing run directory; a viewer: exit 0 (2 on bad input)."""
    from parity.verdict.localize import locate_text

    run_dir = _existing_dir(args.run_dir, "RUN_DIR")
    cases = _load_cases(args)
    for case in cases:  # every case's run checked before anything is printed
        if not inside(run_dir, case.name).is_dir():
            raise UsageError(f"{run_dir}: no run of case {case.name} here ({run_dir / case.name} is not a directory)"
                             + _runs_like(run_dir, case.name))
    print("\n\n".join(locate_text(case, run_dir, args.top)[0] for case in cases))
    return 0


def cmd_report(args) -> int:
    from parity.report.pages import write_report
    from parity.report.regression import regression_report

    run_dir = _run_dir(args.run_dir, "RUN_DIR")
    against = _run_dir(args.against, "--against") if args.against else None
    md, html = write_report(run_dir)
    print(f"report: {md}\n        {html}")
    if against:
        text, changed = regression_report(run_dir, against)
        print(text)
        return 1 if changed else 0
    return 0


def cmd_evidence(args) -> int:
    from parity.report.evidence import evidence

    run_dir = _run_dir(args.run_dir, "RUN_DIR")
    name = None if args.case is None else case_name_arg(args.case, "--case")
    if name is not None and not inside(run_dir, name).is_dir():
        raise UsageError(f"--case: no run of case {name} in {run_dir}" + _runs_like(run_dir, name))
    print(evidence(run_dir, name, args.format))
    return 0


def cmd_baselines(args) -> int:
    from parity.verdict import baselines

    root = Path(args.baselines)
    if args.action == "lint":
        problems = baselines.lint(root)
        # Unused files are judged against the case files beside the baseline root, where there are any.
        cases_dir = root.parent / "cases"
        unused = baselines.unused_baselines(root, load_cases([cases_dir])) if cases_dir.is_dir() else []
        for p in problems:
            print(p)
        for p in unused:
            print(f"{p}: unused: its case or setup no longer exists")
        print(f"{len(problems)} problem(s), {len(unused)} unused baseline(s) in {root}")
        return 1 if problems else 0
    return 2


def cmd_calibrate(args) -> int:
    from parity.calibrate import calibrate

    for case in _load_cases(args):
        print(calibrate(case, Path(args.out), args.steps, args.timeout, args.multiple, args.floor))
    return 0


def _runs_like(run_dir: Path, name: str) -> str:
    """"; did you mean: ..." with the case runs in run_dir closest to `name`, or ""."""
    from parity.report.model import find_case_runs

    return did_you_mean(close_names(name, find_case_runs(run_dir)))


def _existing_dir(p: str, what: str) -> Path:
    path = Path(p)
    if not path.is_dir():
        raise UsageError(f"{what}: {p} is not a directory")
    return path


def _run_dir(p: str, what: str) -> Path:
    """A directory holding at least one case run (what `parity run` writes), checked before anything is drawn."""
    from parity.report.model import find_case_runs

    path = _existing_dir(p, what)
    if not find_case_runs(path):
        raise UsageError(f"{what}: {p} holds no case runs; allowed: a run directory written by `parity run` or pytest")
    return path


def bare_flag_default(argv: list[str], flag: str, choices, default: str, cases_dir: Path | None = None) -> list[str]:
    """`FLAG` followed by an option, an existing path, a case name in `cases_dir` or nothing means `FLAG=default`.

    argparse would otherwise take the next word (`--update-baselines cases/x.toml`) as the flag's
    value and reject or, worse, swallow a case path. Any other word stays the flag's value, so a
    misspelt mode is reported against the flag.
    """
    fixed = list(argv)
    for i, word in enumerate(fixed):
        following = fixed[i + 1] if i + 1 < len(fixed) else None
        if word == flag and following not in choices and (
                following is None or following.startswith("-") or names_a_path(following)
                or (cases_dir is not None and names_a_case(following, cases_dir))):
            fixed[i] = f"{flag}={default}"
    return fixed


def _update_mode(value: str) -> str:
    if value not in UPDATE_MODES:
        raise argparse.ArgumentTypeError(f"allowed: {', '.join(UPDATE_MODES)}")
    return value


def parser(settings: Settings = DEFAULTS) -> argparse.ArgumentParser:
    """The command line; its defaults for cases, --baselines, --out and --device come from `settings`
    (the [tool.parity] table found from the current directory, over DEFAULTS)."""
    top = argparse.ArgumentParser(prog="parity", description="Numerics parity tests for PyTorch distributed training setups.",
                                  epilog="Defaults for the cases, --baselines, --out and --device come from the "
                                         "[tool.parity] table of the nearest pyproject.toml at or above the current "
                                         "directory, where there is one.")
    sub = top.add_subparsers(dest="command", required=True)
    top.set_defaults(cases_dir=settings.cases)  # where a case name is looked up (parity.case.names)
    cases, baseline_root = [str(settings.cases)], str(settings.baselines)
    case_help = f"case files, folders of them, or case names (NAME means {settings.cases}/NAME.toml)"

    def add_run_options(command):
        command.add_argument("--device", choices=DEVICES, default=settings.device,
                             help="auto: CUDA when enough GPUs are visible, else CPU with gloo ranks (default %(default)s)")
        command.add_argument("--out", default=str(settings.out), help="run directory (default %(default)s)")
        command.add_argument("--steps", type=STEPS, help="override every setup's step count")
        command.add_argument("--timeout", type=TIMEOUT, default=DEFAULT_TIMEOUT_S,
                             help="seconds per setup before its launch's ranks are killed (default %(default)s)")

    run = sub.add_parser("run", help="run cases and judge them")
    run.add_argument("cases", nargs="*", default=cases, help=case_help + " (default %(default)s)")
    add_run_options(run)
    run.add_argument("--baselines", default=baseline_root, help="baseline root (default %(default)s)")
    run.add_argument("--update-baselines", nargs="?", const="failing", type=_update_mode, default=None,
                     metavar=UPDATE_METAVAR, help=UPDATE_HELP)
    run.add_argument("--no-report", action="store_true", help="skip report.md/report.html")
    run.add_argument("--plan", choices=PLANS, default="suite",
                     help="suite (default): all cases together, each distinct setup trained once, one launch per "
                          "world size; case: each case planned alone; setup: one launch per setup, nothing shared")
    run.add_argument("--repeat", action=argparse.BooleanOptionalAction, default=None,
                     help="run each reference twice and compare bitwise before anything else "
                          "(default: the case's [expect] repeat, else on for CUDA, off for CPU)")
    nodes = run.add_argument_group("across nodes", "run the same command on every node; node 0 plans, judges and "
                                   "reports, and hosts torchrun's c10d rendezvous at --rdzv-endpoint")
    nodes.add_argument("--nnodes", type=positive(int, 4096), default=1, help="how many nodes (default 1)")
    nodes.add_argument("--node-rank", type=int, help="this node's rank, 0 to NNODES-1")
    nodes.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a free port on it")
    nodes.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local (default): run here; slurm: print a job script that runs this command on "
                            "--nnodes nodes (one `parity run` per node, each starting torchrun)")
    nodes.add_argument("--submit", action="store_true", help="with --launcher slurm: write the script into --out "
                                                             "and submit it with sbatch")
    run.set_defaults(fn=cmd_run)

    compare = sub.add_parser("compare", help="judge an existing run directory without running")
    compare.add_argument("run_dir")
    compare.add_argument("cases", nargs="+", help=case_help)
    compare.add_argument("--baselines", default=baseline_root, help="baseline root (default %(default)s)")
    compare.add_argument("--update-baselines", nargs="?", const="failing", type=_update_mode, default=None,
                         metavar=UPDATE_METAVAR, help=UPDATE_HELP)
    compare.set_defaults(fn=cmd_compare)

    locate = sub.add_parser(
        "locate", help="where each pair's probes first part (a viewer: exit 0, 2 on bad input)",
        description="For each case, per pair of setups: the first probe (probes.csv, in causal order: forward "
                    "modules, then gradients, then updates, step by step) that differs under the case's mode, the "
                    "entries just before it, and the largest relative differences at that step. A viewer: it "
                    "exits 0 whether or not the probes diverge (a negative control is meant to; `parity compare` "
                    "gives the verdict), and 2 on bad input.")
    locate.add_argument("run_dir", help="a run directory (written by `parity run` or pytest, or copied from elsewhere)")
    locate.add_argument("cases", nargs="+", help=case_help)
    locate.add_argument("--top", type=positive(int, 10_000), default=10,
                        help="how many of the largest differences to list (default %(default)s)")
    locate.set_defaults(fn=cmd_locate)

    report = sub.add_parser("report", help="write report.md and report.html for a run directory")
    report.add_argument("run_dir")
    report.add_argument("--against", help="an older run directory: list the cases whose verdict or numbers changed")
    report.set_defaults(fn=cmd_report)

    evidence = sub.add_parser("evidence", help="print a markdown block for a pull request")
    evidence.add_argument("run_dir")
    evidence.add_argument("--case", help="only this case: its name, or its case file's path (default: every case in RUN_DIR)")
    evidence.add_argument("--format", choices=EVIDENCE_FORMATS, default="mermaid",
                          help="mermaid: curves as Mermaid charts, which GitHub renders in a PR comment as pasted; "
                               "png: links to each case's figure, for a report uploaded with its images (default %(default)s)")
    evidence.set_defaults(fn=cmd_evidence)

    listing = sub.add_parser("list", help="list cases with world size, mode, outcome and markers")
    listing.add_argument("cases", nargs="*", default=cases, help=case_help + " (default %(default)s)")
    listing.set_defaults(fn=cmd_list)

    baselines = sub.add_parser("baselines", help="check the stored baselines")
    baselines.add_argument("action", choices=("lint",))
    baselines.add_argument("--baselines", default=baseline_root, help="baseline root (default %(default)s)")
    baselines.set_defaults(fn=cmd_baselines)

    calibrate = sub.add_parser("calibrate", help="measure each setup's error against a float64 CPU oracle; propose tolerances")
    calibrate.add_argument("cases", nargs="+", help=case_help)
    add_run_options(calibrate)
    calibrate.add_argument("--multiple", type=positive(float), default=3.0, help="proposed rtol = multiple x the largest error against the oracle (default 3: two setups may err in opposite directions, plus headroom)")
    calibrate.add_argument("--floor", type=positive(float), default=1e-7, help="smallest rtol proposed")
    calibrate.set_defaults(fn=cmd_calibrate)
    return top


def _terminate(signum, _frame):
    # SIGTERM (a cancelled CI job, `timeout`) unwinds like Ctrl-C, so runs record that they were
    # interrupted and the launcher takes its ranks down.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # The defaults come from [tool.parity] before the update mode is parsed: read it as if updating,
        # then again as it is, where the mode writes no missing baseline (a missing baselines folder is bad input then).
        project = project_settings(Path.cwd(), updating=True)
        settings = layered(project, DEFAULTS)
        argv = bare_flag_default(argv, "--update-baselines", UPDATE_MODES, "failing", settings.cases)
        args = parser(settings).parse_args(argv)
        if getattr(args, "update_baselines", None) not in WRITES_MISSING:
            project_settings(Path.cwd())
    except InputError as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    args.project, args.given = project, {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader that went away is found here, not in the flush at exit
        return code
    except InputError as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`| head`): end quietly, as a program killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return 128 + signal.SIGPIPE
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
