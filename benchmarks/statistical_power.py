"""Statistical mode's false-alarm rate and power, measured with the harness's own ensemble and test.

Trains the reference of the given statistical cases M times (their perturbation, members 1..M), and
every setup of the cases (a layout that must pass, controls that must fail), through parity's runner;
then draws D ensembles of K of the M members and tests with parity.verdict.ensemble.evaluate, exactly as a
verdict does: every member left out of the draw (the null: the same config with another perturbation)
and every setup. Prints per candidate the share of draws that fail, the median of max |z| / limit, and
the median first failing window.

    PYTHONPATH=$PWD python benchmarks/statistical_power.py --out /tmp/power --members 20 \\
        cases/statistical_single_vs_fsdp2.toml cases/control_statistical_*.toml
    PYTHONPATH=$PWD python benchmarks/statistical_power.py --out /tmp/power --members 20 --reuse CASES...

The cases must share one reference (they then share its members). Draws share members, so the held-out
tests are correlated: the margins say more than a count of zero failures does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parity.verdict import ensemble  # noqa: E402
from parity.verdict.case_verdict import load_runs  # noqa: E402
from parity.run.runner import RunOptions, run_suite  # noqa: E402
from parity.trainers import load_cases  # noqa: E402


def widened(cases, members: int):
    """The cases with `members` ensemble members each (the same M for all: one shared ensemble)."""
    return [replace(c, expect=replace(c.expect, statistical=replace(c.expect.statistical, members=members)))
            for c in cases]


def measure(cases, out: Path, k: int, draws: int, seed: int) -> dict:
    """name -> list of (failed, max |z| / limit, first failing window end or None), one per draw it was tested in."""
    runs = {}
    for c in cases:
        runs.update({name: run for name, run in load_runs(c, out).items() if name not in runs})
    first = cases[0]
    members = [m.name for m in first.ensemble]
    setups = {s.name: runs[s.name] for c in cases for s in c.setups}
    steps = runs[first.reference.name]["metrics"]["step"]
    st = replace(first.expect.statistical, members=k)
    rng = np.random.default_rng(seed)
    outcomes: dict[str, list] = {}
    for _ in range(draws):
        chosen = sorted(rng.choice(len(members), size=k, replace=False).tolist())
        ens = {members[i]: runs[members[i]] for i in chosen}
        held_out = [runs[members[i]] for i in range(len(members)) if i not in chosen]
        candidates = {**setups, **{f"held-out {j}": r for j, r in enumerate(held_out)}}
        result = ensemble.evaluate(st, first.expect.tolerance, steps, ens, candidates)
        if result["problems"]:
            raise SystemExit(f"no band: {result['problems']}")
        lim = result["summary"]["limit"]
        for name, tests in result["tests"].items():
            label = "held-out members" if name.startswith("held-out ") else name
            failed = [t["first_failure"]["step"] for t in tests.values() if t["first_failure"]]
            margin = max(t["max_abs_z"] / lim for t in tests.values())
            outcomes.setdefault(label, []).append((bool(failed), margin, min(failed) if failed else None))
    return outcomes


def table(outcomes: dict, k: int, members: int, draws: int) -> str:
    lines = [f"K = {k} of M = {members} members, {draws} draws", "",
             "| candidate | tests | fail | median max abs z / limit | median first failing window (last step) |",
             "|---|---|---|---|---|"]
    for name, rows in outcomes.items():
        fails = [r for r in rows if r[0]]
        where = statistics.median(r[2] for r in fails) if fails else "—"
        lines.append(f"| {name} | {len(rows)} | {len(fails) / len(rows):.1%} | "
                     f"{statistics.median(r[1] for r in rows):.3g} | {where} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--members", type=int, default=20, help="M: members trained")
    p.add_argument("--k", type=int, default=None, help="K: members per drawn ensemble (default: the cases')")
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="judge the runs already in --out; train nothing")
    args = p.parse_args(argv)
    cases = load_cases(args.cases)
    if any(c.expect.statistical is None for c in cases) or len({c.reference for c in cases}) != 1:
        raise SystemExit("every case must be statistical, with one and the same reference")
    k = args.k or cases[0].expect.statistical.members
    cases = widened(cases, args.members)
    if not args.reuse:
        began = time.perf_counter()
        results = run_suite(cases, args.out, {c.name: "cpu" for c in cases}, RunOptions(repeat=False))
        bad = {f"{c}/{s}": r.message for c, rs in results.items() for s, r in rs.items() if r.status != "ok"}
        if bad:
            raise SystemExit(f"runs failed: {bad}")
        print(f"trained in {time.perf_counter() - began:.0f} s", flush=True)
    print(table(measure(cases, args.out, k, args.draws, args.seed), k, args.members, args.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main())
