"""Speed and scale, measured in one run on this machine: a benchmark to read, not a test to pass.

    python benchmarks/scale.py [--only suite|long] [--cases cases] [--suite-steps N]
                               [--long-steps 100000] [--repeats 3]

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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


PARTS = {"suite": suite_part, "long": long_runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(PARTS), action="append",
                   help="run only this part (repeatable); default: every part")
    p.add_argument("--cases", nargs="+", default=[str(REPO / "cases")],
                   help="suite part: case files or directories (default: the committed cases)")
    p.add_argument("--suite-steps", type=int, default=None, help="suite part: every case's step count (default: their own)")
    p.add_argument("--long-steps", type=int, default=LONG_STEPS, help="long part: steps per setup")
    p.add_argument("--repeats", type=int, default=3, help="long part: runs per timing; the best is reported")
    args = p.parse_args(argv)
    options = {"suite": {"cases": args.cases, "steps": args.suite_steps},
               "long": {"steps": args.long_steps, "repeats": args.repeats}}
    for name in args.only or PARTS:
        print("\n".join(PARTS[name](**options[name])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
