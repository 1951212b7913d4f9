"""Run a suite of cases: seed checkpoints, then the launches parity.run.plan chose, then provenance for failures.

It returns how each setup's run ended, and leaves in the run directory every setup's records (or a
run.json saying why there are none), the plan file and each case's launches.json. Judging those
records is parity.session's.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from datetime import datetime, timezone
from pathlib import Path

from parity.core import records
from parity.core.errors import InputError
from parity.trainers import TRAINERS, missing, seed_trainer
from parity.trainers.seed_cache import SeedBuildError, verify
from parity.core.process import DEFAULT_TIMEOUT_S, LaunchResult
from parity.run.launch.torchrun import launch as launch_torchrun
from parity.core.paths import inside
from parity.core.provenance import run_origin
from parity.core.rundir import claim, fresh_case_dir, prepare_out, work_dir
from parity.run.plan import Job, Launch, Training, plan, summary
from parity.case.attention import check_attention
from parity.case.schema import REPEAT_SUFFIX, Case, Setup

class DeviceError(InputError):
    """This machine cannot run the case: too few GPUs for the requested device, or a trainer not installed."""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str, case: Case, gpus: int | None = None) -> str:
    """auto: CUDA when enough GPUs are visible for the case, else CPU with gloo ranks; never a quiet fallback.

    `gpus` is how many GPUs this process may use (default: all visible). The device's SDPA
    kernels are checked too, so a case that cannot run there is rejected before anything starts.
    """
    if (why := missing(case)) is not None:
        raise DeviceError(f"{case.path}: {why}")
    if requested == "cpu":
        device = "cpu"
    else:
        gpus = visible_gpus() if gpus is None else gpus
        if requested == "cuda" and gpus < case.world_size:
            raise DeviceError(f"{case.path}: device cuda: case {case.name} needs {case.world_size} GPUs "
                              f"(one per rank of its largest setup), {gpus} visible")
        device = "cuda" if gpus >= case.world_size else "cpu"
    check_attention(case, device)
    return device


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def repeat_setup(case: Case) -> Setup:
    """The reference's second run, compared bitwise with the first before anything else."""
    return replace(case.reference, name=case.reference.name + REPEAT_SUFFIX, repeat=True)


def runs_of(case: Case, repeat: bool) -> list[Setup]:
    """Every run the case's verdict reads: its setups, the reference's repeat (with `repeat`), and statistical
    mode's ensemble members, which are trained, and shared across cases, like any setup."""
    return [*case.setups, *([repeat_setup(case)] if repeat else []), *case.ensemble]


def case_jobs(case: Case, device: str, seed, repeat: bool) -> list[Job]:
    """runs_of(case) as jobs from `seed` (seed_for's)."""
    return [Job(case, s, device, str(seed.path), seed.sha256, case.probe_steps(s)) for s in runs_of(case, repeat)]


def wants_repeat(case: Case, device: str, requested: bool | None = None) -> bool:
    """The command line's choice, else the case's `[expect] repeat`, else on for CUDA and off for CPU."""
    for choice in (requested, case.expect.repeat):
        if choice is not None:
            return choice
    return device == "cuda"


def with_steps(case: Case, steps: int | None) -> Case:
    if not steps:
        return case
    return replace(case, setups=tuple(replace(s, train=replace(s.train, steps=steps)) for s in case.setups))


def seed_for(case: Case, cache: Path | None, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
    """The case's seed checkpoint (its own seed_checkpoint, or the cached build), hashed and checked now.

    Returns parity.trainers.seed_cache.SeedInfo; the notes say what was found damaged and repaired on the way.
    A case whose setups train a trainer's own model gets that trainer's seed checkpoint (parity.trainers.seed_trainer;
    built on `device` if not cached; parity.trainers.seed_cache.SeedBuildError if the trainer cannot build it).
    """
    return seed_trainer(case).seed_checkpoint(case, device, cache, timeout_s)


def seed_or_none(case: Case, cache: Path | None, device: str, timeout_s: float):
    """seed_for, checked before anything is written, or None where a trainer failed to build its seed:
    run_suite then records that failure in every setup of the case, and other cases still run."""
    try:
        return seed_for(case, cache, device, timeout_s)
    except SeedBuildError:
        return None


@dataclass(frozen=True)
class RunOptions:
    """How run_suite runs a suite, the same for every case of it.

    `steps` overrides every setup's step count; `timeout_s` bounds each launch; `cache` is the seed cache
    (None: the default one). `repeat`: see wants_repeat. `plan`: one of parity.run.plan.PLANS, written to
    OUT/`plan_file`. `cores`: how many CPU cores lanes may use (default: this process's; one across nodes).
    `gpus(world_size, device)`: a context manager giving the GPU ids one launch may use (None: every
    visible one). `on_progress(progress, setup_elapsed)` sees each launch's progress, `on_plan(text)` the
    plan (parity.run.plan.summary) before the first launch. `leader` (parity.run.launch.nodes.Leader):
    every launch spans the nodes that joined it, this process being node 0.
    """

    steps: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    cache: Path | None = None
    repeat: bool | None = None
    plan: str = "suite"
    plan_file: str = "plan.json"
    cores: int | None = None
    gpus: Callable | None = None
    on_progress: Callable | None = None
    on_plan: Callable | None = None
    leader: object = None


def run_case(case: Case, out: Path, device: str = "auto", steps: int | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S, cache: Path | None = None) -> dict[str, LaunchResult]:
    """Run every setup of one case (run_suite of that case alone); returns {setup name: how it ended}."""
    device = resolve_device(device, case)
    options = RunOptions(steps=steps, timeout_s=timeout_s, cache=cache)
    return run_suite([case], out, {case.name: device}, options)[case.name]


def run_suite(cases: list[Case], out: Path, devices: dict[str, str], options: RunOptions = RunOptions(),
              seeds: dict | None = None, commands: dict | None = None) -> dict[str, dict[str, LaunchResult]]:
    """Run every setup of every case, planned together (parity.run.plan); returns {case: {setup: how it ended}}.

    `devices`: each case's resolved device (resolve_device). `seeds`: seed_for(case) per case name
    where the caller checked it already, before writing anything. `commands`: per case name, the command
    that reproduces the run, recorded in each run.json. With `options.repeat` (see wants_repeat), each
    reference runs a second time, last in its launch. The caller holds case_lock for every case. The plan,
    each launch's status and time, and which job reused which training are written to OUT/options.plan_file
    and to each case's launches.json.
    """
    out = prepare_out(out)
    cases = [with_steps(c, options.steps) for c in cases]
    results: dict[str, dict[str, LaunchResult]] = {c.name: {} for c in cases}
    seeds, provenance, jobs = dict(seeds or {}), {}, []
    # The code under test, the repository run from: asked of git once, after the first seed checkpoint is found,
    # so that bad input (a seed cache that is a file) stops the run before any process starts.
    started_from = functools.cache(lambda: run_origin(Path.cwd(), outputs=(out,)))
    for case in cases:
        seeds[case.name], provenance[case.name], new_jobs = _start_case(
            case, out, devices[case.name], options, seeds.get(case.name), started_from,
            (commands or {}).get(case.name), results[case.name])
        jobs += new_jobs
    # Lanes (parity.run.plan.lanes) use the cores a launch leaves idle; not across nodes, whose launches go in turn.
    launches = plan(jobs, options.plan,
                    cores=1 if options.leader else options.cores or len(os.sched_getaffinity(0)))
    if options.on_plan:
        options.on_plan(summary(launches, options.plan))
    _run_launches(launches, jobs, out, options, provenance, results, cases)
    for case in cases:
        _fail_on_changed_seed(case, out, seeds[case.name], provenance[case.name], devices[case.name],
                              results[case.name])
    return results


def _start_case(case: Case, out: Path, device: str, options: RunOptions, seed, origin, command: list[str] | None,
                results: dict[str, LaunchResult]) -> tuple:
    """A case's seed checkpoint, its fresh folder and provenance, and its jobs; returns (seed, provenance,
    jobs). `origin()`: the code under test and parity's version. Where a trainer could not make its seed
    checkpoint, every run of the case fails with why (into `results`) and it has no jobs."""
    try:
        seed = seed or seed_for(case, options.cache, device, options.timeout_s)
        unbuilt = None
    except SeedBuildError as e:
        seed, unbuilt = None, LaunchResult("failed", None, str(e), 0.0)
    for note in seed.notes if seed else ():
        print(f"parity: {note}", file=sys.stderr, flush=True)
    fresh_case_dir(out, case.name)
    provenance = _provenance(case, seed, {**origin(), "command": command})
    repeat = wants_repeat(case, device, options.repeat)
    if not unbuilt:
        return seed, provenance, case_jobs(case, device, seed, repeat)
    for s in runs_of(case, repeat):
        _write_failure(out, case.name, s.name, unbuilt, provenance, device, s.world_size)
        results[s.name] = unbuilt
    return seed, provenance, []


def _provenance(case: Case, seed, origin: dict) -> dict:
    """What every run.json of the case records about where its numbers came from."""
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "seed_checkpoint": seed and str(seed.path), "seed_checkpoint_sha256": seed and seed.sha256,
            "case_path": str(case.path), "case_sha256": case.sha256, **origin}


def _run_launches(launches: list[Launch], jobs: list[Job], out: Path, options: RunOptions, provenance: dict,
                  results: dict, cases: list[Case]) -> None:
    """Every launch in turn (a split launch's lanes at once); on Ctrl-C or SIGTERM the setups that did not
    finish say so. The plan log is written however the launches end."""
    log: list[dict] = []
    run = _SuiteRun(out, options, provenance, results, log)
    try:
        with work_dir(out, ".launch-") as run.workdir:
            i = 0
            while i < len(launches):
                group = launches[i:i + launches[i].lanes]  # one launch, or the lanes of a split one
                run.at_once([(i + 1 + k, launch) for k, launch in enumerate(group)])
                i += len(group)
    except BaseException:
        interrupted = LaunchResult("interrupted", None, "the run was interrupted before this setup finished", 0.0)
        for j in jobs:
            if j.setup.name not in results[j.case.name]:
                _write_failure(out, j.case.name, j.setup.name, interrupted, provenance[j.case.name], j.device,
                               j.setup.world_size)
        raise
    finally:
        _write_plan_log(out, options.plan_file, options.plan, launches, log, cases)


def _fail_on_changed_seed(case: Case, out: Path, seed, provenance: dict, device: str,
                          results: dict[str, LaunchResult]) -> None:
    """No verdict, and no baseline, may rest on a seed checkpoint that changed during the run."""
    if seed and not verify(seed.path, seed.sha256):
        changed = LaunchResult("failed", None, f"seed checkpoint {seed.path} changed during the run", 0.0)
        for name in results:
            _write_failure(out, case.name, name, changed, provenance, device, case.world_size, overwrite=True)
            results[name] = changed


class _SuiteRun:
    """Runs a plan's launches, one after another (a split launch's lanes at once), and files every job's outcome."""

    def __init__(self, out: Path, options: RunOptions, provenance: dict, results: dict, log: list[dict]):
        self.out, self.provenance, self.results, self.log = Path(out), provenance, results, log
        self.timeout_s, self.on_progress, self.cache, self.leader = (options.timeout_s, options.on_progress,
                                                                     options.cache, options.leader)
        self.gpus = options.gpus or (lambda _n, _device: nullcontext(None))
        self.workdir: Path | None = None
        self.stopping = threading.Event()  # set when the run is interrupted while lanes are running

    def at_once(self, numbered: list[tuple[int, Launch]]) -> None:
        """Run these launches (the lanes of one split launch) at once, each in a thread waiting on its own
        torchrun. On Ctrl-C or SIGTERM every lane kills its ranks (run_process's abort) before this re-raises,
        and the trainings they cut short are left for run_suite to mark interrupted."""
        if len(numbered) == 1:
            self.launch(*numbered[0])
            return
        with ThreadPoolExecutor(len(numbered)) as pool:
            futures = [pool.submit(self.launch, number, launch) for number, launch in numbered]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                self.stopping.set()
                wait(futures)
                for _, launch in numbered:
                    for t in launch.trainings:
                        for j in t.jobs:
                            if (r := self.results[j.case.name].get(j.setup.name)) is not None and r.status != "ok":
                                del self.results[j.case.name][j.setup.name]
                raise

    def _stopped(self) -> str | None:
        return "the run was interrupted" if self.stopping.is_set() else None

    def launch(self, number: int, launch: Launch) -> None:
        if TRAINERS[launch.trainer].own_ranks:
            self._torchrun(number, launch)
        else:
            self._external(number, launch)

    def _torchrun(self, number: int, launch: Launch) -> None:
        """Every training of the launch in one torchrun; after a crash or timeout the culprit fails alone
        and the trainings it kept from running get a launch of their own."""
        pending, attempt = list(launch.trainings), 0
        while pending and not self.stopping.is_set():
            attempt += 1
            name = f"launch{number}" + (f"-retry{attempt - 1}" if attempt > 1 else "")
            first = pending[0].first
            doc = {"out": str(self.out.resolve()), "device": launch.device, "determinism": first.case.determinism,
                   "world_size": launch.world_size,  # across nodes, each node's rank count comes from here
                   "timeout_s": self.timeout_s, "progress": str(self.workdir / f"{name}.progress"),
                   "launched_at": time.time(),
                   "jobs": [{"case": t.first.case.name, "setup": t.first.setup.to_dict(),
                             "seed_checkpoint": t.first.seed_checkpoint, "probe_steps": list(t.first.probe_steps),
                             "provenance": self.provenance[t.first.case.name]} for t in pending]}
            with self.gpus(launch.world_size, launch.device) as gpus:
                # The rank logs that explain a failure: those of the setup it stopped in.
                result = self._launch(doc, name, launch.world_size, gpus, partial(self._unfinished_dirs, pending))
            left = [t for t in pending if not self._finished(t.first)]
            self._log(number, name, launch, pending, result)
            for t in pending:
                if t not in left:
                    self._finish(t, LaunchResult("ok", 0, "", result.wall_s))
            if not left:
                return
            culprit = next((t for t in left if result.progress and _names(result.progress, t.first)), left[0])
            if result.status == "ok":  # torchrun exited 0 but some records are missing: no retry can help
                culprit = None
            started = result.progress is not None
            for t in left if culprit is None or not started else [culprit]:
                shutil.copy(self.workdir / f"{name}.log", self._dir(t.first).parent / f"torchrun-{name}.log")
                self._fail(t, result if result.status != "ok" else LaunchResult(
                    "failed", 0, "torchrun exited 0 but this setup wrote no records", result.wall_s))
            # A launch that failed before its first setup started (process group, imports) fails them all.
            pending = [t for t in left if t is not culprit] if culprit is not None and started else []

    def _launch(self, doc: dict, name: str, world_size: int, gpus, log_dirs) -> LaunchResult:
        """One torchrun: on this node alone, or this node's part of a launch the other nodes join."""
        if self.leader is None:
            return launch_torchrun(doc, world_size, self.workdir, name, self.timeout_s, self.on_progress, gpus, log_dirs,
                                   abort=self._stopped)
        nodes = self.leader.nodes
        result = launch_torchrun(doc, nodes.ranks_per_node(world_size), self.workdir, name, self.timeout_s,
                                 self.on_progress, gpus, log_dirs, nodes.rendezvous(name, self.timeout_s),
                                 self.leader.failure_elsewhere(name),
                                 on_written=lambda plan_path: self.leader.announce(name, plan_path, self.timeout_s))
        self.leader.post_result(name, result)
        if result.status == "ok":
            return result
        return replace(result, message=f"{nodes.where()}: {result.message}\nThe other nodes:\n"
                                       + self.leader.others_said(name))

    def _external(self, number: int, launch: Launch) -> None:
        """A setup of a trainer that runs outside parity's ranks: one launch, prepared and run by its trainer."""
        t = launch.trainings[0]
        j = t.first
        trainer = TRAINERS[j.setup.trainer]
        try:
            spec, ckpt, extra = trainer.prepare(j.case, j.setup, j.device, self.cache, self.timeout_s, self.workdir,
                                                j.seed_checkpoint)
        except SeedBuildError as e:  # this setup's own seed checkpoint could not be built
            result = LaunchResult("failed", None, str(e), 0.0)
        else:
            with self.gpus(launch.world_size, launch.device) as gpus:
                result = trainer.run_setup(spec, j.setup, j.case.name, self.out, j.device, ckpt,
                                           self.provenance[j.case.name], self.timeout_s, gpus, extra)
            self._log(number, f"launch{number}", launch, [t], result)
        if self._finished(j):
            self._finish(t, result)
        else:
            self._fail(t, result)

    def _unfinished_dirs(self, trainings: list[Training]) -> list[Path]:
        return [self._dir(t.first) for t in trainings if not self._finished(t.first)][:1]

    def _dir(self, job: Job) -> Path:
        return records.setup_dir(self.out, job.case.name, job.setup.name)

    def _finished(self, job: Job) -> bool:
        """Whether the job's run.json says ok: rank 0 (or the command runner) writes it last."""
        try:
            return records.read_json(self._dir(job) / "run.json").get("status") == "ok"
        except records.RecordError:
            return False

    def _finish(self, t: Training, result: LaunchResult) -> None:
        """A finished training: its records copied to every job that shares it."""
        self.results[t.first.case.name][t.first.setup.name] = result
        for j in t.shared_with:
            records.copy_run(self._dir(t.first), self._dir(j), {
                **self.provenance[j.case.name], "case": j.case.name, "setup": j.setup.name,
                "trained_as": t.first.label})
            self.results[j.case.name][j.setup.name] = result

    def _fail(self, t: Training, result: LaunchResult) -> None:
        for j in t.jobs:
            _write_failure(self.out, j.case.name, j.setup.name, result, self.provenance[j.case.name], j.device,
                           j.setup.world_size, overwrite=True)
            self.results[j.case.name][j.setup.name] = result

    def _log(self, number: int, name: str, launch: Launch, trainings: list[Training], result: LaunchResult) -> None:
        self.log.append({"launch": number, "name": name, "world_size": launch.world_size, "device": launch.device,
                         "trainer": launch.trainer, "lane": launch.lane, "lanes": launch.lanes, "status": result.status,
                         "wall_s": result.wall_s, "ended": time.time(),
                         "trainings": [t.to_dict() for t in trainings]})


def _names(progress: dict, job: Job) -> bool:
    return progress.get("case") == job.case.name and progress.get("setup") == job.setup.name


def _write_plan_log(out: Path, plan_file: str, kind: str, launches: list[Launch], log: list[dict], cases) -> None:
    """OUT/plan_file: the plan and how each launch went; <case>/launches.json: the launches that served the case."""
    log = sorted(log, key=lambda entry: entry["launch"])  # lanes finish in any order; a launch's retries keep theirs
    records.write_json(claim(out, plan_file), {"plan": kind, "planned": [launch.to_dict() for launch in launches],
                                                "launches": log})
    for case in cases:
        mine = []
        for entry in log:
            served = {}
            for t in entry["trainings"]:
                for label in [t["trained_as"], *t["shared_with"]]:
                    if label.split("/", 1)[0] == case.name:
                        served[label.split("/", 1)[1]] = t["trained_as"]
            if served:
                mine.append({**{k: v for k, v in entry.items() if k != "trainings"}, "setups": served})
        records.write_json(inside(out, case.name) / "launches.json", {"plan": kind, "plan_file": plan_file,
                                                                       "launches": mine})


def _write_failure(out: Path, case_name: str, setup_name: str, result: LaunchResult, provenance: dict, device: str,
                   world_size: int, overwrite: bool = False) -> None:
    """A run.json that says why the setup has no records, so no comparison can pass on it (an ok one stays,
    unless `overwrite`)."""
    d = records.setup_dir(out, case_name, setup_name)
    if not overwrite and (d / "run.json").is_file():
        try:
            if records.read_json(d / "run.json").get("status") == "ok":
                return
        except records.RecordError:
            pass
    status = result.status if result.status != "ok" else "failed"
    records.write_json(d / "run.json", {**provenance, "case": case_name, "setup": setup_name, "status": status,
                                        "device": device, "backend": backend_for(device),
                                        "world_size": world_size, "message": result.message,
                                        "ended": datetime.now(timezone.utc).isoformat()})
