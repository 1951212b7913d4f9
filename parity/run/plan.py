"""The suite planner: every selected case's setups, planned together into as few launches as possible.

A *job* is one (case, setup) whose records the suite needs. Jobs that would compute the same numbers
(the same resolved setup and training config, seed checkpoint, probed steps, determinism settings
and device, in this one process's torch) become one *training*: it trains once, into its first
job's folder, and the runner copies its records to the others. Trainings in parity's ranks of one world
size, device and determinism settings share one torchrun *launch* (the settings are applied once per
process, before CUDA starts); a setup of a trainer with its own process is a launch of its own.

Three plans, so that a result can be checked against a plainer way of getting it:
    suite  all cases together: trainings shared across cases, one launch per world size
    case   each case alone, as if run by itself (its setups still share its launches)
    setup  one launch per setup, nothing shared: the naive plan

Pure data: nothing here starts a process or imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from parity.case.schema import MEMBER_SUFFIX, Case, Setup
from parity.trainers import TRAINERS

PLANS = ("suite", "case", "setup")


@dataclass(frozen=True)
class Job:
    case: Case
    setup: Setup
    device: str
    seed_checkpoint: str
    seed_sha256: str
    probe_steps: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.case.name}/{self.setup.name}"


@dataclass
class Training:
    """One training run; jobs[0] trains (its folder holds the rank logs), the others receive copies."""

    jobs: list[Job]

    @property
    def first(self) -> Job:
        return self.jobs[0]

    @property
    def shared_with(self) -> list[Job]:
        return self.jobs[1:]

    def to_dict(self) -> dict:
        return {"trained_as": self.first.label, "shared_with": [j.label for j in self.shared_with]}


@dataclass
class Launch:
    world_size: int
    device: str
    trainer: str  # one that trains in parity's ranks: one torchrun over every training in order; otherwise one training
    trainings: list[Training] = field(default_factory=list)
    # A CPU launch whose ranks leave cores idle is split into `lanes` launches that run at once, side by
    # side in the plan: lane 0 .. lanes - 1.
    lane: int = 0
    lanes: int = 1

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "device": self.device, "trainer": self.trainer,
                "trainings": [t.to_dict() for t in self.trainings], "lane": self.lane, "lanes": self.lanes}


def training_key(job: Job) -> str:
    """Everything a training's numbers depend on; equal keys compute equal bits (the setup's name is not in it)."""
    setup = {k: v for k, v in job.setup.to_dict().items() if k != "name"}
    identity = {"setup": setup, "seed_sha256": job.seed_sha256, "probe_steps": list(job.probe_steps),
                "determinism": job.case.determinism, "device": job.device}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def plan(jobs: list[Job], kind: str = "suite", cores: int = 1) -> list[Launch]:
    """The launches that produce every job's records under plan `kind` (one of PLANS), in the order to run
    them. `cores`: the CPU cores this run may use; a merged CPU launch of world size w splits into up to
    cores // w lanes (see lanes)."""
    if kind not in PLANS:
        raise ValueError(f"plan {kind!r}; allowed: {', '.join(PLANS)}")
    if kind == "case":
        by_case: dict[str, list[Job]] = {}
        for j in jobs:
            by_case.setdefault(j.case.name, []).append(j)
        return [lane for case_jobs in by_case.values() for launch in _plan(case_jobs, share=True, merge=True)
                for lane in lanes(launch, cores)]
    launches = _plan(jobs, share=kind == "suite", merge=kind == "suite")
    return [lane for launch in launches for lane in lanes(launch, cores)] if kind == "suite" else launches


def in_ranks(trainer: str) -> bool:
    """Whether the trainer's setups train inside parity's ranks (and so can share a torchrun)."""
    return TRAINERS[trainer].own_ranks


def lanes(launch: Launch, cores: int) -> list[Launch]:
    """A CPU launch of world size w with trainings to spare, split into up to cores // w launches that run at
    once, each on cores of its own (world size 1 on 2 cores: two trainings at a time). Trainings are dealt
    longest first to the lane with the fewest steps, and keep their planned order within a lane. A launch
    with a repeat run stays whole: the repeat checks the reference in the process that ran it."""
    n = min(cores // launch.world_size, len(launch.trainings))
    if launch.device != "cpu" or not in_ranks(launch.trainer) or n < 2 or any(t.first.setup.repeat
                                                                               for t in launch.trainings):
        return [launch]
    parts = [Launch(launch.world_size, launch.device, launch.trainer, lane=i, lanes=n) for i in range(n)]
    load = [0] * n
    for t in sorted(launch.trainings, key=lambda t: -t.first.setup.train.steps):
        i = load.index(min(load))
        parts[i].trainings.append(t)
        load[i] += t.first.setup.train.steps
    order = {id(t): k for k, t in enumerate(launch.trainings)}
    for p in parts:
        p.trainings.sort(key=lambda t: order[id(t)])
    return parts


def _plan(jobs: list[Job], share: bool, merge: bool) -> list[Launch]:
    trainings: dict[str, Training] = {}
    for i, j in enumerate(jobs):
        key = training_key(j) if share else str(i)
        trainings.setdefault(key, Training([])).jobs.append(j)
    in_parity: dict[tuple, Launch] = {}
    launches: list[Launch] = []
    # A reference's second run goes last in its launch, after everything else the process has done.
    for t in sorted(trainings.values(), key=lambda t: t.first.setup.repeat):
        s = t.first.setup
        if not in_ranks(s.trainer) or not merge:
            launches.append(Launch(s.world_size, t.first.device, s.trainer, [t]))
            continue
        group = (s.trainer, s.world_size, t.first.device, json.dumps(t.first.case.determinism, sort_keys=True))
        if group not in in_parity:
            in_parity[group] = Launch(s.world_size, t.first.device, s.trainer)
        in_parity[group].trainings.append(t)
    # Launches of parity's ranks by world size, then the others, each in the order its jobs came.
    return sorted(in_parity.values(), key=lambda launch: launch.world_size) + launches if merge else launches


def summary(launches: list[Launch], kind: str = "suite") -> str:
    """The plan as text: a headline, then one line per launch naming each training once and the jobs that reuse it."""
    jobs = sum(len(t.jobs) for launch in launches for t in launch.trainings)
    trainings = sum(len(launch.trainings) for launch in launches)
    lines = [f"plan ({kind}): {jobs} setups, {trainings} trained ({jobs - trainings} reused), {len(launches)} launches"]
    for i, launch in enumerate(launches, 1):
        names = _entries(launch.trainings)
        what = "torchrun" if in_ranks(launch.trainer) else launch.trainer
        lane = f", lane {launch.lane + 1} of {launch.lanes} (at once)" if launch.lanes > 1 else ""
        lines.append(f"  launch {i}: {what}, world size {launch.world_size}, {launch.device}{lane}: {'; '.join(names)}")
    return "\n".join(lines)


def _entries(trainings: list[Training]) -> list[str]:
    """One summary entry per training, except an ensemble's members (<reference>.memberNN of one case), which
    are one entry where the first of them stands."""
    ensembles: dict[tuple, list[Training]] = {}
    for t in trainings:
        if MEMBER_SUFFIX in t.first.setup.name:
            ensembles.setdefault((t.first.case.name, t.first.setup.name.rsplit(MEMBER_SUFFIX, 1)[0]), []).append(t)
    firsts = {id(group[0]): group for group in ensembles.values()}
    entries = []
    for t in trainings:
        if id(t) in firsts:
            group = firsts[id(t)]
            also = sorted({j.case.name for m in group for j in m.shared_with})
            numbers = [m.first.setup.name.rsplit(MEMBER_SUFFIX, 1)[1] for m in group]
            runs = f"..{numbers[-1]}" if len(numbers) == int(numbers[-1]) - int(numbers[0]) + 1 else \
                "".join(f", {n}" for n in numbers[1:])
            entries.append(f"{t.first.label}{runs} ({len(group)} ensemble members"
                           + (f"; also for {', '.join(also)})" if also else ")"))
        elif MEMBER_SUFFIX not in t.first.setup.name:
            entries.append(t.first.label + (f" (also {', '.join(j.label for j in t.shared_with)})"
                                            if t.shared_with else ""))
    return entries


def shares(cases: list[Case], n: int) -> dict[str, int]:
    """Case name -> which of n shares (pytest-xdist workers) plans it.

    Cases that may share a training stay in one share, so each worker can plan its own share alone;
    the groups are then dealt out largest first to the least loaded share. The grouping is by setup
    and training config (what decides a training but the seed checkpoint's bytes, which are not known
    before it is built), so it may keep together cases that turn out not to share; never the reverse.
    """
    parent = {c.name: c.name for c in cases}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = name = parent[parent[name]]
        return name

    owner: dict[str, str] = {}
    cost: dict[str, float] = {}
    for c in cases:
        for s in (*c.setups, *c.ensemble):  # cases with one reference share its ensemble too
            setup = {k: v for k, v in s.to_dict().items() if k != "name"}
            key = json.dumps([setup, str(c.seed_checkpoint), c.probe_steps(s), c.determinism], sort_keys=True,
                             default=str)
            if key in owner:
                parent[root(c.name)] = root(owner[key])
            else:
                owner[key] = c.name
                cost[c.name] = cost.get(c.name, 0.0) + s.train.steps * s.world_size
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault(root(c.name), []).append(c.name)
    load = [0.0] * max(n, 1)
    assigned = {}
    for names in sorted(groups.values(), key=lambda g: (-sum(cost.get(x, 0.0) for x in g), g[0])):
        i = load.index(min(load))
        load[i] += sum(cost.get(x, 0.0) for x in names)
        assigned.update(dict.fromkeys(names, i))
    return assigned
