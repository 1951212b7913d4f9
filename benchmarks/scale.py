"""Speed and scale, measured in one run on this machine: a benchmark to read, not a test to pass.

    python benchmarks/scale.py [--only suite|long|floor] [--cases cases] [--suite-steps N]
                               [--long-steps 100000] [--repeats 3]
                               [--floor-steps 5] [--floor-batch 16] [--floor-processes 2 4 8]

Parts (each prints its lines with the goal it is held to):

- suite: (a) the committed cases run twice on CPU gloo ranks, with the suite planner (`--plan
  suite`) and with the naive plan (`--plan setup`: one launch per setup, nothing shared), one after
  the other; their wall times and ratio, and whether every record came out bit-identical. Then
  (c), from the naive run, where a launch's time goes: torchrun and interpreter start, imports,
  process group, then per setup: mesh, model and wrappers, seed load, steps, weight digest (each
  naive launch trains exactly one setup). Goal: planner at most 0.45x naive.
- long: (b) `parity compare` and `parity report` of one case of two setups of 100,000 steps each,
  written synthetically into a temporary run directory. Each command runs as its own child
  process; its wall time and peak RSS are measured from the outside (os.wait4's rusage of that
  child alone), with its CPU seconds beside (on a busy shared machine wall time is mostly waiting).
  Goal: both together at most 3 s, each under 300 MB.
- floor: (d) what a rank layout costs on CPU against one process training the same global batch of
  the debugmodel on the same cores (os.sched_getaffinity), with parity's own model, data, loss,
  optimizer and determinism settings. (i) one process, as many torch threads as cores, the whole
  batch: compute. (ii) n spawned processes of 1 thread each (as parity's CPU ranks run), each its
  1/n of the batch, in a gloo group they never use: compute plus oversubscription. (iii) the same
  processes, the gradients averaged by one all_reduce before each optimizer step: a data-parallel
  layout. Median seconds per step after 2 warm-up steps (a layout's step ends when its last
  process's does), the split oversubscription = (ii) - (i), collectives = (iii) - (ii), and
  (iii)/(i), for each n of --floor-processes. Beside each time, the CPU seconds per step of every
  thread of the layout's processes (where others' load stretches wall time, the work), and beside
  (i) one process on one thread (with cores taken by others, a team of threads waits for its
  descheduled members). No goal: it says what a case's layout costs. Every spawned process is ended
  on an error, after a timeout and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without installing

from parity.core import records  # noqa: E402
from parity.trainers import load_cases  # noqa: E402

LONG_STEPS = 100_000
LONG_GOAL_S, LONG_GOAL_MB = 3.0, 300
DIVERGES_AT = 60_000  # where the second setup starts to differ by a few ulps
CASE = "long_run"
SETUPS = ("replicate", "hsdp_8x1")
# The debugmodel's parameters (6 layers), as parity's own runs record them in weights.csv.
LAYER_PARAMS = ("attention.wk.weight", "attention.wo.weight", "attention.wq.weight", "attention.wv.weight",
                "attention_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                "feed_forward.w3.weight", "ffn_norm.weight")
PARAMS = [f"layers.{i}.{p}" for i in range(6) for p in LAYER_PARAMS] + ["norm.weight", "output.weight",
                                                                          "tok_embeddings.weight"]

CASE_TOML = f"""
description = "Synthetic: two setups of {{steps}} steps, the second off by a few ulps from step {DIVERGES_AT}."

[train]
model = "debugmodel"
steps = {{steps}}
dtype = "float32"

[setups.{SETUPS[0]}]
dp_api = "replicate"
dp_replicate = 8

[setups.{SETUPS[1]}]
dp_api = "fully_shard"
dp_replicate = 8
dp_shard = 1

[expect]
mode = "bitwise"
outcome = "match"
"""


def synthetic_metrics(steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A noisy decreasing loss, float32-valued grad norms with spikes, a warmup lr; like a real run's columns."""
    step = np.arange(1, steps + 1)
    loss = 2.0 + 8.5 * np.exp(-step / (steps / 8)) + 0.05 * rng.standard_normal(steps)
    grad_norm = (0.4 * np.exp(-step / steps) + 0.02 * rng.standard_normal(steps) ** 2).astype(np.float32)
    grad_norm[rng.integers(0, steps, 20)] *= 30  # a few spikes, which the figure must keep visible
    lr = 0.005 * np.minimum(1.0, step / 200)
    return {"step": step, "loss": loss, "grad_norm": grad_norm.astype(np.float64), "lr": lr,
            "tokens": np.full(steps, 2048), "step_time_s": 0.05 + 0.01 * rng.random(steps)}


def drifted(metrics: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The same run, off by a relative 1e-9 (a few ulps of a double) from DIVERGES_AT on."""
    out = dict(metrics)
    late = metrics["step"] >= DIVERGES_AT
    for name in ("loss", "grad_norm"):
        noise = np.where(late, 1e-9 * rng.standard_normal(len(late)), 0.0)
        out[name] = metrics[name] * (1.0 + noise)
    return out


def write_setup(directory: Path, name: str, metrics: dict[str, np.ndarray], weight_scale: float, steps: int,
                case_path: Path) -> None:
    columns = list(metrics)
    values = [metrics[c].tolist() for c in columns]  # Python ints and floats: written with repr, exactly
    records.write_csv(directory / "metrics.csv", columns, [dict(zip(columns, row)) for row in zip(*values)])
    weights = []
    for i, p in enumerate(PARAMS):
        norm = (1.0 + i / 10) * weight_scale
        weights.append({"param": p, "norm": norm, "sha256": hashlib.sha256(repr(norm).encode()).hexdigest(),
                        **{c: norm * (k - 1.5) / 2 for k, c in enumerate(records.SKETCH_COLUMNS)}})
    records.write_weights(directory / "weights.csv", weights)
    records.write_json(directory / "run.json", {
        "torch": "2.13.0+cpu", "python": "3.11.7", "host": "bench", "case_path": str(case_path),
        "case_sha256": hashlib.sha256(case_path.read_bytes()).hexdigest(), "git_commit": "0" * 40,
        "command": ["parity", "run", str(case_path), "--out", str(directory.parent.parent)],
        "case": CASE, "setup": name, "status": "ok", "device": "cpu", "platform": "cpu", "backend": "gloo",
        "fingerprint": {"torch": "2.13.0+cpu", "device_type": "cpu", "cpu_model": "bench", "threads": 1,
                        "platform": "cpu"},
        "world_size": 8, "mesh_shape": [8], "mesh_dim_names": ["dp_replicate"],
        "train": {"model": "debugmodel", "steps": steps, "dtype": "float32"}, "notes": [],
        "peak_memory": {"measure": "host_rss", "per_rank_bytes": [412 * 2**20 + r for r in range(8)],
                        "max_bytes": 412 * 2**20 + 7},
        "started": "2026-01-01T00:00:00+00:00", "ended": "2026-01-01T01:00:00+00:00"})


def write_long_run(root: Path, steps: int) -> tuple[Path, Path]:
    """(run directory, case file) of a synthetic case of two setups of `steps` steps."""
    rng = np.random.default_rng(0)
    case_path = root / "cases" / f"{CASE}.toml"
    case_path.parent.mkdir(parents=True)
    case_path.write_text(CASE_TOML.format(steps=steps))
    run_dir = root / "run"
    ref = synthetic_metrics(steps, rng)
    write_setup(run_dir / CASE / SETUPS[0], SETUPS[0], ref, 1.0, steps, case_path)
    write_setup(run_dir / CASE / SETUPS[1], SETUPS[1], drifted(ref, rng), 1.0 + 1e-9, steps, case_path)
    return run_dir, case_path


def timed(argv: list[str], pycache: Path) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds) of one child process, measured by os.wait4.

    Compiled bytecode is kept in `pycache`, as an installed package keeps it: without it every run
    would compile parity's modules first (PYTHONDONTWRITEBYTECODE is set on some machines).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    err = child.stderr.read().decode()
    child.stderr.close()
    if child.returncode not in (0, 1):  # 1: the case failed (no stored baseline); 2 would be bad input
        raise SystemExit(f"{' '.join(argv)} exited {child.returncode}:\n{err}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is in KiB on Linux


def best_of(argv: list[str], repeats: int, pycache: Path) -> tuple[float, float, float]:
    """The fastest of `repeats` runs (others' load on a shared machine only ever adds time): wall, RSS, CPU."""
    return min(timed(argv, pycache) for _ in range(repeats))


def long_runs(steps: int = LONG_STEPS, repeats: int = 3) -> list[str]:
    """`parity compare` and `parity report` of two setups of `steps` steps: wall time and peak RSS of each."""
    parity = [sys.executable, "-m", "parity.cli"]
    with tempfile.TemporaryDirectory(prefix="parity-scale-") as tmp:
        run_dir, case_path = write_long_run(Path(tmp), steps)
        pycache = Path(tmp) / "pycache"
        compare_s, compare_mb, compare_cpu = best_of(parity + ["compare", str(run_dir), str(case_path), "--baselines",
                                                               str(Path(tmp) / "baselines")], repeats, pycache)
        verdict = json.loads((run_dir / CASE / "verdict.json").read_text())
        size_kb = (run_dir / CASE / "verdict.json").stat().st_size / 1024
        report_s, report_mb, report_cpu = best_of(parity + ["report", str(run_dir)], repeats, pycache)
    total = compare_s + report_s
    first = verdict["pairs"][0]["diverged"]
    found = f"{first['metric']} step {first['step']}" if first else "none"
    ok = total <= LONG_GOAL_S and max(compare_mb, report_mb) < LONG_GOAL_MB
    return [
        (f"(b) long runs: 2 setups x {steps} steps (best of {repeats}; first divergence found: {found}, "
         f"verdict.json {size_kb:.0f} KiB)"),
        f"  parity compare  {compare_s:6.2f} s  {compare_mb:6.0f} MB peak RSS  ({compare_cpu:.2f} s CPU)",
        f"  parity report   {report_s:6.2f} s  {report_mb:6.0f} MB peak RSS  ({report_cpu:.2f} s CPU)",
        f"  total           {total:6.2f} s  (goal <= {LONG_GOAL_S:g} s, each < {LONG_GOAL_MB} MB): "
        + ("met" if ok else "NOT met"),
    ]


PLANNER_GOAL = 0.45  # suite wall with the planner, at most this fraction of the naive plan's


def run_plan(cases: list[str], out: Path, how: str, steps: int | None) -> tuple[float, int]:
    """`parity run` of the cases with one plan: (wall seconds, exit code)."""
    argv = [sys.executable, "-m", "parity.cli", "run", *cases, "--device", "cpu", "--out", str(out), "--plan", how,
            "--no-report"] + (["--steps", str(steps)] if steps else [])
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    if done.returncode not in (0, 1):
        sys.exit(f"parity run --plan {how} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - start, done.returncode


def numbers(out: Path, case: str, setup: str) -> dict:
    """What a verdict reads of one setup's run: every record, step times left out (no two runs share those)."""
    d = out / case / setup
    got = {"run": records.read_json(d / "run.json").get("status")}
    if (d / "metrics.csv").is_file():
        got["metrics"] = [{k: v for k, v in r.items() if k != "step_time_s"} for r in records.read_metrics(d / "metrics.csv")]
    for name in ("weights.csv", "probes.csv"):
        if (d / name).is_file():
            got[name] = (d / name).read_bytes()
    return got


def suite(case_paths: list[str], steps: int | None, scratch: Path) -> tuple[list[str], Path]:
    cases = load_cases(case_paths)
    walls, codes = {}, {}
    for how in ("suite", "setup"):
        walls[how], codes[how] = run_plan(case_paths, scratch / how, how, steps)
    pairs = [(c.name, s.name) for c in cases for s in c.setups]
    same = [p for p in pairs if numbers(scratch / "suite", *p) == numbers(scratch / "setup", *p)]
    plan = records.read_json(scratch / "suite" / "plan.json")
    n_launches = len(plan["launches"])
    n_trained = sum(len(x["trainings"]) for x in plan["launches"])
    ratio = walls["suite"] / walls["setup"]
    lines = ["(a) suite wall time, CPU gloo ranks: " + (f"{len(cases)} cases, --steps {steps}" if steps else
                                                        f"{len(cases)} cases at their own step counts"),
             f"    planner (--plan suite):  {walls['suite']:8.1f} s  {n_launches} launches, {n_trained} trainings "
             f"for {len(pairs)} setups (exit {codes['suite']})",
             f"    naive   (--plan setup):  {walls['setup']:8.1f} s  {len(pairs)} launches (exit {codes['setup']})",
             f"    ratio planner/naive:     {ratio:8.3f}  (goal <= {PLANNER_GOAL}: {'met' if ratio <= PLANNER_GOAL else 'NOT met'})",
             f"    bit-identical records:   {len(same)}/{len(pairs)} setups"
             + ("" if len(same) == len(pairs) else f"; differ: {', '.join('/'.join(p) for p in pairs if p not in same)}")]
    return lines, scratch / "setup"


def startup(run_dir: Path) -> list[str]:
    """Medians over the launches of a naive run (one setup each), grouped by world size."""
    by_world: dict[int, list[dict]] = {}
    for run_json in sorted(run_dir.glob("*/*/run.json")):
        run = records.read_json(run_json)
        if run.get("status") == "ok" and "timings" in run:
            by_world.setdefault(run["world_size"], []).append(run["timings"])
    parts = [("torchrun + interpreter start", "torchrun_start_s"), ("rank imports (torch, parity)", "rank_imports_s"),
             ("process group", "process_group_s"), ("mesh and wrappers (parallelize)", "parallelize_s"),
             ("allocate + seed checkpoint load", "seed_load_s"), ("meta model, probes, optimizer", "build_s"),
             ("training steps", "steps_s"), ("weight digest", "digest_s")]
    lines = ["(c) where a launch's time goes (median seconds over the naive run's launches; built-in trainer)"]
    header = f"    {'':32}" + "".join(f"  ws {w:<3} (n={len(t):<2})" for w, t in sorted(by_world.items()))
    lines.append(header)
    for label, key in parts:
        cells = []
        for _, timings in sorted(by_world.items()):
            values = [t[key] for t in timings if key in t]
            cells.append(f"{statistics.median(values):16.2f}" if values else f"{'-':>16}")
        lines.append(f"    {label:32}" + "".join(cells))
    return lines


def suite_part(cases: list[str], steps: int | None) -> list[str]:
    """(a) and (c): one planner run and one naive run of the suite, in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="parity-scale-suite-") as scratch:
        lines, naive = suite(cases, steps, Path(scratch))
        return lines + startup(naive)


FLOOR_STEPS, FLOOR_BATCH = 5, 16  # about a minute on 2 cores; 16 rows: parity's default global batch
FLOOR_PROCESSES = [2, 4, 8]  # 8: parity's CPU cases' world size
FLOOR_WARMUP = 2  # steps trained before the clock starts: first calls allocate and pick their kernels
FLOOR_TIMEOUT_S = 900  # per launch; past it every process of the launch is ended


def floor_step(model, opt, batches, train, step: int, world: int, rank: int, all_reduce: bool) -> None:
    """One step as parity's ranks take it (parity.rank.train, less probes and faults): this rank's rows of the
    global batch, forward and backward, the gradients averaged over the ranks if asked, clip, AdamW."""
    import torch
    import torch.distributed as dist

    from parity.rank.step import loss_fn, sdpa_context

    inputs, labels = (torch.from_numpy(a) for a in batches.local(step, world, rank))
    with sdpa_context(train.attention):
        loss_fn(model(inputs), labels).backward()
    grads = [p.grad for p in model.parameters()]
    if all_reduce:
        # One flat all_reduce, as DDP's single bucket of a model this small; gloo has no AVG, so SUM then divide.
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(reduced.view_as(g))
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def floor_phase(train, steps: int, world: int, rank: int, all_reduce: bool) -> tuple[float, float] | None:
    """A fresh model trained FLOOR_WARMUP + `steps` steps; to rank 0, the layout's (median wall seconds per
    timed step, CPU seconds per timed step of all its processes together).

    Each rank stamps the end of each step on the system-wide monotonic clock; a layout's step ends when
    its last rank's does. Ranks that train alone drift apart, and the latest stamp still says when the
    layout as a whole had trained that step. The CPU seconds (every thread of every process) are what
    the layout's work is where others' load stretches the wall time."""
    import torch.distributed as dist

    from parity.rank.data import Batches
    from parity.rank.model import build_model
    from parity.rank.step import make_optimizer

    cfg = train.model_config
    model = build_model(cfg, train.seq_len, train.seed)
    opt = make_optimizer(list(model.parameters()), train)
    batches = Batches(train.seed, train.global_batch, train.seq_len, cfg.vocab_size)
    for step in range(1, FLOOR_WARMUP + 1):
        floor_step(model, opt, batches, train, step, world, rank, all_reduce)
    dist.barrier()  # every rank starts the clock together, whatever its warm-up took
    stamps, cpu = [time.monotonic()], time.process_time()
    for step in range(FLOOR_WARMUP + 1, FLOOR_WARMUP + steps + 1):
        floor_step(model, opt, batches, train, step, world, rank, all_reduce)
        stamps.append(time.monotonic())
    cpu = time.process_time() - cpu
    every = [None] * world
    dist.all_gather_object(every, (stamps, cpu))  # after the clock stopped
    if rank != 0:
        return None
    ends = [max(column) for column in zip(*(s for s, _ in every))]
    return statistics.median(b - a for a, b in zip(ends, ends[1:])), sum(c for _, c in every) / steps


def floor_rank(rank: int, world: int, threads: int, phases: tuple[bool, ...], train, steps: int, store: str,
               results) -> None:
    """One process of a layout: `threads` torch threads and parity's determinism settings, as a parity rank
    sets them (parity.rank.train.main), a gloo group; one phase per entry of `phases` (all_reduce or not)."""
    import torch
    import torch.distributed as dist

    from parity.core.determinism import DETERMINISM, apply_determinism

    try:
        torch.set_num_threads(threads)
        apply_determinism(DETERMINISM)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        timings = [floor_phase(train, steps, world, rank, all_reduce) for all_reduce in phases]
        if rank == 0:
            results.put(timings)
            results.close()
            results.join_thread()  # the result is in the pipe before the process ends
    except KeyboardInterrupt:  # Ctrl-C reaches every process: the parent alone says so
        os._exit(130)
    except BaseException:  # noqa: BLE001 - shown here; the parent sees the exit code and ends the others
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # no interpreter teardown, as parity's ranks: destroying a gloo group can hang


def launch_layout(world: int, threads: int, phases: tuple[bool, ...], train, steps: int) -> list[tuple[float, float]]:
    """floor_phase's (wall, CPU) seconds per step of each phase, from `world` spawned processes; none of them
    outlives this call (an error, a timeout or Ctrl-C ends them all)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="parity-floor-") as tmp:
        procs = [ctx.Process(target=floor_rank, daemon=True,
                             args=(r, world, threads, phases, train, steps, f"{tmp}/store", results))
                 for r in range(world)]
        started = []
        try:
            for proc in procs:
                proc.start()
                started.append(proc)
            return wait_for_result(procs, results, time.monotonic() + FLOOR_TIMEOUT_S)
        finally:
            for proc in started:
                if proc.is_alive():
                    proc.terminate()
            for proc in started:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()


def wait_for_result(procs: list, results, deadline: float):
    """Rank 0's result, or SystemExit once a process failed or the deadline passed."""
    while True:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            pass
        failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if failed:
            raise SystemExit(f"(d) floor: a process of a {len(procs)}-process layout exited {failed[0]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"(d) floor: a {len(procs)}-process layout ran past {FLOOR_TIMEOUT_S} s")


def floor(steps: int, global_batch: int, processes: list[int]) -> list[str]:
    """(d): one process on every core against n single-threaded processes, alone and with an all_reduce."""
    from parity.case.schema import Train

    train = Train(global_batch=global_batch)
    cores = len(os.sched_getaffinity(0))
    ((compute, compute_cpu),) = launch_layout(1, cores, (False,), train, steps)
    # Beside the floor: one thread alone. Where other work holds some of the cores, a team of `cores`
    # threads waits at every barrier for its descheduled members, and (i) reads slower than this.
    ((one_thread, one_thread_cpu),) = launch_layout(1, 1, (False,), train, steps)
    lines = [f"(d) floor: {train.model}, global batch {global_batch} x {train.seq_len} tokens, on {cores} cores: "
             f"median wall seconds per step of {steps} after {FLOOR_WARMUP} warm-up",
             "    (CPU: CPU seconds per step, every thread of every process together)",
             f"    (i) 1 process, {cores} torch threads: {compute:.3f} s (CPU {compute_cpu:.3f}) = compute;  "
             f"1 process, 1 thread: {one_thread:.3f} s (CPU {one_thread_cpu:.3f})",
             f"    {'processes':>9}  {'(ii) alone':>10}  {'CPU':>6}  {'(iii) all_reduce':>16}  {'CPU':>6}  "
             f"{'oversubscription':>16}  {'collectives':>11}  {'(iii)/(i)':>9}"]
    for n in processes:
        (alone, alone_cpu), (reduced, reduced_cpu) = launch_layout(n, 1, (False, True), train, steps)
        lines.append(f"    {n:>9}  {alone:10.3f}  {alone_cpu:6.3f}  {reduced:16.3f}  {reduced_cpu:6.3f}  "
                     f"{alone - compute:+16.3f}  {reduced - alone:+11.3f}  {reduced / compute:8.2f}x")
    return lines


PARTS = {"suite": suite_part, "long": long_runs, "floor": floor}


def check_floor(parser: argparse.ArgumentParser, args) -> None:
    """Exit 2 with one line where the floor part's options cannot make a layout."""
    if args.floor_steps < 1 or args.floor_batch < 1:
        parser.error(f"--floor-steps {args.floor_steps} --floor-batch {args.floor_batch}: allowed: whole numbers >= 1")
    for n in args.floor_processes:
        if n < 2 or args.floor_batch % n:
            parser.error(f"--floor-processes {n}: allowed: a count from 2 up that divides "
                         f"--floor-batch {args.floor_batch}, so each process trains the same share")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(PARTS), action="append",
                   help="run only this part (repeatable); default: every part")
    p.add_argument("--cases", nargs="+", default=[str(REPO / "cases")],
                   help="suite part: case files or directories (default: the committed cases)")
    p.add_argument("--suite-steps", type=int, default=None, help="suite part: every case's step count (default: their own)")
    p.add_argument("--long-steps", type=int, default=LONG_STEPS, help="long part: steps per setup")
    p.add_argument("--repeats", type=int, default=3, help="long part: runs per timing; the best is reported")
    p.add_argument("--floor-steps", type=int, default=FLOOR_STEPS, help="floor part: timed steps per layout")
    p.add_argument("--floor-batch", type=int, default=FLOOR_BATCH, help="floor part: the global batch (rows)")
    p.add_argument("--floor-processes", type=int, nargs="+", default=FLOOR_PROCESSES,
                   help="floor part: the process counts of the layouts (each divides the global batch)")
    args = p.parse_args(argv)
    check_floor(p, args)
    options = {"suite": {"cases": args.cases, "steps": args.suite_steps},
               "long": {"steps": args.long_steps, "repeats": args.repeats},
               "floor": {"steps": args.floor_steps, "global_batch": args.floor_batch,
                         "processes": args.floor_processes}}
    for name in args.only or PARTS:
        print("\n".join(PARTS[name](**options[name])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
