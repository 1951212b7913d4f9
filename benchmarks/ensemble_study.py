"""Long runs: is a gap noise or a bug? A measured study of ensemble verdicts, to choose `mode = "statistical"`.

The reference setup (tiny model, one process) is trained M times under each of two perturbations a
correct change could also cause:

    data     another data seed per member (a setup's `seed` override: the built-in generator draws
             other rows, the weights still come from the reference's seed checkpoint)
    weights  the reference's data, but the seed checkpoint multiplied by (1 + eps * z), z ~ N(0, 1) per
             element, eps the float32 machine epsilon: noise at the level of a reduction order

plus candidates that must pass (the unperturbed reference; FSDP over 2 ranks, a real layout change)
and controls that must fail (lr x1.1; warmup removed; every gradient scaled by the token count, the
loss unchanged). Every run goes through parity's own runner (generated case files, run_suite), with
probes off. Nothing depends on the total step count (the lr schedule is warmup then constant), so one
run of --steps gives every shorter horizon by truncation.

Then, for every horizon, candidate and verdict rule (see `verdicts`), how often it fails against
ensembles of K members drawn from the M (leave-one-out for the members themselves): the measured
false-alarm rate on the null candidates, the power on the controls.

    python benchmarks/ensemble_study.py [--out DIR] [--members 16] [--k 8] [--steps 400] [--jobs 2]
    python benchmarks/ensemble_study.py --reuse DIR      # evaluate DIR/series.json again, no training

Prints markdown tables; writes DIR/series.json (every run's loss and grad norm) and DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without installing

from parity.verdict import ensemble  # noqa: E402

from parity.core import records
from parity.run.runner import RunOptions, run_suite, seed_for  # noqa: E402
from parity.case.loader import load_case  # noqa: E402
from parity.case.schema import Setup, Tolerance, Train

REFERENCE = "ref"
NULLS = ("ref", "fsdp2")  # candidates a correct change could produce: they must pass
CONTROLS = ("lr_x1_1", "no_warmup", "grad_x_tokens")  # planted errors: they must fail
DATA_SEED0 = 1000  # member i of the data ensemble trains on data seed DATA_SEED0 + i


def case_text(args) -> str:
    """The study's case: the reference first, then the data members, the null layout and the controls."""
    tokens = args.global_batch * args.seq_len
    lines = [
        'description = "Ensemble study: the reference, data-seed members, a layout candidate and controls."',
        "[train]",
        f'model = "tiny"\nsteps = {args.steps}\nglobal_batch = {args.global_batch}\nseq_len = {args.seq_len}',
        f"lr = {args.lr}\nwarmup_steps = {args.warmup_steps}",
        "[probes]\nenabled = false",  # probes change nothing a run records; they only cost time here
        f'[setups.{REFERENCE}]\ndp_api = "none"',
    ]
    lines += [f'[setups.data_{i:02d}]\ndp_api = "none"\nseed = {DATA_SEED0 + i}' for i in range(1, args.members + 1)]
    lines += [
        '[setups.fsdp2]\ndp_api = "fully_shard"\ndp_shard = 2',
        f'[setups.lr_x1_1]\ndp_api = "none"\nlr = {args.lr * 1.1!r}',
        '[setups.no_warmup]\ndp_api = "none"\nwarmup_steps = 0',
        # A loss summed over the step's tokens where their mean was meant: every gradient x tokens.
        f'[setups.grad_x_tokens]\ndp_api = "none"\nfault = {{ kind = "scale_grad", param = "*", factor = {tokens} }}',
        '[expect]\nmode = "tolerance"',  # never judged: the study reads the records
    ]
    return "\n".join(lines) + "\n"


def perturbed_checkpoints(base: Path, count: int, where: Path) -> list[Path]:
    """`count` copies of the seed checkpoint, each element times (1 + eps z), z ~ N(0, 1) seeded by the copy."""
    import torch
    import torch.distributed.checkpoint as dcp

    from parity.rank.model import build_model
    from parity.core.presets import PRESETS
    from parity.trainers.seed_cache import deterministic_writer

    state = build_model(PRESETS["tiny"], 1, 0, torch.float32).state_dict()  # the shapes; values loaded next
    eps = torch.finfo(torch.float32).eps
    paths = []
    with warnings.catch_warnings():  # DCP's "assuming single process" warnings: that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(base))
        for k in range(1, count + 1):
            gen = torch.Generator().manual_seed(k)
            noisy = {name: (t * (1 + eps * torch.randn(t.shape, generator=gen, dtype=t.dtype))
                            if t.is_floating_point() else t) for name, t in sorted(state.items())}
            path = where / f"weights_{k:02d}"
            dcp.save(noisy, storage_writer=deterministic_writer(str(path)))
            paths.append(path)
    return paths


def train_all(args, out: Path) -> dict:
    """Every run of the study through parity.run.runner.run_suite, in --jobs threads (each waits on its own
    torchrun); returns {run name: {"loss": [...], "grad_norm": [...], "steps_s": float, "world_size": n}}."""
    case_path = out / "ensemble_study.toml"
    case_path.write_text(case_text(args))
    case = load_case(case_path)  # validated like any case file
    # Passed explicitly: a slice of the case whose first setup is a data member would otherwise take
    # the seed checkpoint of that member's seed (the reference's rule), not the reference's.
    seed = seed_for(case, None)
    ckpts = perturbed_checkpoints(seed.path, args.members, out / "checkpoints")
    weight_cases = [replace(case, name=f"weights_{k:02d}", setups=(case.reference,), seed_checkpoint=p)
                    for k, p in enumerate(ckpts, 1)]
    seeds = {c.name: seed_for(c, None) for c in weight_cases}
    # Deal the runs to --jobs parts, largest first to the least loaded (a 2-rank run costs 2 cores).
    units = [(s.world_size, s) for s in case.setups] + [(1, c) for c in weight_cases]
    parts = [([], []) for _ in range(args.jobs)]
    load = [0] * args.jobs
    for cost, unit in sorted(units, key=lambda u: -u[0]):
        i = load.index(min(load))
        load[i] += cost
        parts[i][0 if isinstance(unit, Setup) else 1].append(unit)

    def run_part(i: int) -> Path:
        setups, cases = parts[i]
        chosen = ([replace(case, setups=tuple(setups))] if setups else []) + cases
        part_out = out / f"part{i}"
        results = run_suite(chosen, part_out, {c.name: "cpu" for c in chosen}, RunOptions(repeat=False),
                            seeds={case.name: seed, **seeds})
        bad = {f"{c}/{s}": r.message for c, rs in results.items() for s, r in rs.items() if r.status != "ok"}
        if bad:
            raise RuntimeError(f"runs failed: {bad}")
        return part_out

    began = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        part_dirs = list(pool.map(run_part, range(args.jobs)))
    wall = time.perf_counter() - began
    series = {}
    for i, part_out in enumerate(part_dirs):
        setups, cases = parts[i]
        where = [(case.name, s.name, s.name) for s in setups] + [(c.name, REFERENCE, c.name) for c in cases]
        for case_name, setup_name, label in where:
            d = records.setup_dir(part_out, case_name, setup_name)
            cols = records.read_metric_columns(d / "metrics.csv")
            run = records.read_json(d / "run.json")
            series[label] = {"loss": cols["loss"].tolist(), "grad_norm": cols["grad_norm"].tolist(),
                             "steps_s": run["timings"]["steps_s"], "setup_s": run["timings"]["setup_s"],
                             "world_size": run["world_size"]}
    return {"config": {k: v for k, v in vars(args).items() if k not in ("out", "reuse")},
            "wall_s": wall, "jobs": args.jobs, "series": series}


# ---- statistics ---------------------------------------------------------------------------------

# The window rule is parity.verdict.ensemble's (mode = "statistical"), with the float32 default tolerances of
# parity.case.schema as its floor: below them two runs differ by rounding, which `mode = "tolerance"` judges already.
FLOOR = {"loss": Tolerance(1e-5, 0.0), "grad_norm": Tolerance(1e-4, 0.0)}


def window_z(cand: dict, members: list[dict], metric: str, w: int, alpha: float, n_tests: int,
             after: int = 0) -> tuple[bool, float, int]:
    """parity.verdict.ensemble's test on the steps after `after`: windows of w steps, z against the members' t
    prediction band, alpha split (Bonferroni) over `n_tests` windows x metrics. Returns (failed,
    max |z| / limit, the last step of the first failing window or 0)."""
    def values(run):
        return ensemble.window_values(np.asarray(run[metric][after:]), w, metric)

    band = ensemble.Band(np.stack([values(r) for r in members]), metric, FLOOR[metric])
    lim = ensemble.limit(len(members), alpha, n_tests)
    candidate = values(cand)
    ends = after + ensemble.window_ends(np.arange(1, len(cand[metric]) - after + 1), w)
    t = ensemble.test(candidate, band, ends, lim)
    return not t["passed"], t["max_abs_z"] / lim, t["first_failure"]["step"] if t["first_failure"] else 0


def megatron(cand: dict, members: list[dict], metric: str, exclude: int, multiplier: float) -> tuple[bool, float, int]:
    """Megatron's golden-values rule: per step after `exclude`, the members' largest relative deviation from
    their mean; the tolerance is max(that, over all those steps, x multiplier, 1e-3); fail at a step whose
    relative deviation passes it. Returns (failed, max deviation / tolerance, first failing step or 0)."""
    c = np.asarray(cand[metric])[exclude:]
    m = np.stack([np.asarray(r[metric])[exclude:] for r in members])
    mean = m.mean(axis=0)
    spread = np.max(np.abs(m - mean) / np.abs(mean))
    tol = max(spread * multiplier, 1e-3)
    dev = np.abs(c - mean) / np.abs(mean)
    bad = np.flatnonzero(dev > tol)
    return bool(bad.size), float(dev.max() / tol), int(bad[0] + 1 + exclude) if bad.size else 0


def verdicts(args) -> dict:
    """name -> rule(candidate, members) -> (failed, margin, where)."""
    w, a = args.window, args.alpha

    def wz(metrics, after=0):
        def rule(c, ms):
            n = (len(c["loss"]) - after) // w * len(metrics)
            outs = [window_z(c, ms, m, w, a, n, after) for m in metrics]
            failed = [o for o in outs if o[0]]
            return (bool(failed), max(o[1] for o in outs), min(o[2] for o in failed) if failed else 0)
        return rule

    def mg(metrics):
        def rule(c, ms):
            outs = [megatron(c, ms, m, args.exclude, args.multiplier) for m in metrics]
            failed = [o for o in outs if o[0]]
            return (bool(failed), max(o[1] for o in outs), min(o[2] for o in failed) if failed else 0)
        return rule

    late = {f"window-z loss after step {args.late} (w={w})": wz(["loss"], args.late)} if args.late else {}
    return {**late, f"window-z loss (w={w})": wz(["loss"]),
            f"window-z loss+gnorm (w={w})": wz(["loss", "grad_norm"]),
            f"megatron loss (x{args.multiplier}, skip {args.exclude})": mg(["loss"]),
            f"megatron loss+gnorm (x{args.multiplier}, skip {args.exclude})": mg(["loss", "grad_norm"])}


def evaluate(study: dict, args) -> dict:
    """Per perturbation kind, horizon and rule: how often each candidate fails against `draws` ensembles of K."""
    series = study["series"]
    kinds = {"data": [f"data_{i:02d}" for i in range(1, args.members + 1)],
             "weights": [f"weights_{i:02d}" for i in range(1, args.members + 1)]}
    rng = np.random.default_rng(0)
    rules = verdicts(args)
    out = {}
    for kind, names in kinds.items():
        for horizon in args.horizons:
            cut = {n: {m: s[m][:horizon] for m in ("loss", "grad_norm")} for n, s in series.items()}
            # The same draws for every rule and candidate: members are left out of their own ensembles.
            others = {n: [rng.choice([x for x in names if x != n], args.k, replace=False) for _ in range(args.draws)]
                      for n in names}
            anyone = [rng.choice(names, args.k, replace=False) for _ in range(args.draws)]
            for rule_name, rule in rules.items():
                row = {}
                loo = [rule(cut[n], [cut[x] for x in draw]) for n in names for draw in others[n]]
                row["held-out members"] = summarize(loo)
                for cand in (*NULLS, *CONTROLS):
                    row[cand] = summarize([rule(cut[cand], [cut[x] for x in draw]) for draw in anyone])
                out[(kind, horizon, rule_name)] = row
    return out


def summarize(outcomes) -> dict:
    fails = [o for o in outcomes if o[0]]
    return {"fail_rate": len(fails) / len(outcomes), "median_margin": float(np.median([o[1] for o in outcomes])),
            "median_first": int(np.median([o[2] for o in fails])) if fails else 0}


def spread_table(study: dict, args) -> str:
    """How wide each ensemble is, window by window, against the size of each candidate's effect: relative
    sd of the members' window-mean loss, and each candidate's relative distance from the reference."""
    series, w = study["series"], args.window
    loss = {n: ensemble.window_values(np.asarray(r["loss"]), w, "loss") for n, r in series.items()}
    shown = sorted({0, 3, *range(7, len(loss[REFERENCE]), 8), len(loss[REFERENCE]) - 1})
    lines = [f"\n### spread and effects on the window-mean loss (w={w}; relative to the mean / the reference)\n",
             "| window ending at step | " + " | ".join(str((i + 1) * w) for i in shown) + " |",
             "|---" * (len(shown) + 1) + "|"]
    for kind in ("data", "weights"):
        m = np.stack([loss[f"{kind}_{i:02d}"] for i in range(1, args.members + 1)])
        rel = m.std(axis=0, ddof=1) / m.mean(axis=0)
        lines.append(f"| sd of {kind} members | " + " | ".join(f"{rel[i]:.1e}" for i in shown) + " |")
    for cand in ("fsdp2", *CONTROLS):
        rel = np.abs(loss[cand] - loss[REFERENCE]) / loss[REFERENCE]
        lines.append(f"| {cand} vs {REFERENCE} | " + " | ".join(f"{rel[i]:.1e}" for i in shown) + " |")
    clipped = np.mean(np.asarray(series[REFERENCE]["grad_norm"]) > Train().max_norm)
    lines.append(f"\n{REFERENCE}'s pre-clip grad norm is above max_norm {Train().max_norm} at {clipped:.0%} of its steps")
    return "\n".join(lines)


def table(results: dict, kind: str, horizon: int) -> str:
    cols = ["held-out members", *NULLS, *CONTROLS]
    lines = [f"\n### perturbation: {kind}, steps 1..{horizon}\n",
             "| rule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for (k, h, rule), row in results.items():
        if (k, h) != (kind, horizon):
            continue
        cells = []
        for c in cols:
            r = row[c]
            first = f" @{r['median_first']}" if r["fail_rate"] and c in CONTROLS else ""
            cells.append(f"{r['fail_rate']:.0%} ({r['median_margin']:.2g}){first}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="keep the runs here (default: a temporary directory, deleted)")
    p.add_argument("--reuse", help="a directory holding series.json from an earlier run: evaluate only")
    p.add_argument("--members", type=int, default=16, help="M: members trained per perturbation kind")
    p.add_argument("--k", type=int, default=8, help="K: members in one ensemble")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--horizons", type=int, nargs="+", default=[100, 200, 300, 400])
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--window", type=int, default=25)
    p.add_argument("--late", type=int, default=0,
                   help="also the loss window test on steps after this one only: is a late effect still caught?")
    p.add_argument("--alpha", type=float, default=0.01, help="the window test's nominal false-alarm rate")
    p.add_argument("--multiplier", type=float, default=1.5, help="megatron rule: x the members' largest relative deviation")
    p.add_argument("--exclude", type=int, default=30, help="megatron rule: leading steps left out (warm-up)")
    p.add_argument("--draws", type=int, default=50, help="ensembles drawn per candidate")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread, one torchrun each)")
    args = p.parse_args(argv)
    if args.reuse:
        study = json.loads((Path(args.reuse) / "series.json").read_text())
        for key in ("members", "steps", "global_batch", "seq_len", "lr", "warmup_steps"):
            setattr(args, key, study["config"][key])  # what was trained decides; the rules may change
        out = Path(args.reuse)
    else:
        tmp = None if args.out else tempfile.TemporaryDirectory(prefix="parity-ensemble-")
        out = Path(args.out or tmp.name)
        out.mkdir(parents=True, exist_ok=True)
        study = train_all(args, out)
        (out / "series.json").write_text(json.dumps(study))
    args.horizons = [h for h in args.horizons if h <= args.steps]
    s = study["series"]
    step_ms = np.median([r["steps_s"] / len(r["loss"]) for r in s.values() if r["world_size"] == 1]) * 1e3
    print(f"{len(s)} runs of {args.steps} steps (tiny, global_batch {args.global_batch}, seq_len {args.seq_len}, "
          f"lr {args.lr}, warmup {args.warmup_steps}): wall {study['wall_s']:.0f} s with {study['jobs']} at a time; "
          f"median {step_ms:.1f} ms/step at world size 1")
    setup_s = np.median([r["setup_s"] for r in s.values() if r["world_size"] == 1])
    # What a statistical case would add to a suite: K members, the candidate and 3 controls at world size 1,
    # dealt to 2 cores (the study's own wall time includes start-ups and 2 * M members).
    print(f"median {setup_s:.1f} s per world-size-1 run (build, {args.steps} steps, digest); K + 4 such runs on "
          f"2 cores: about {(args.k + 4) * setup_s / 2:.0f} s plus two torchrun start-ups")
    print(f"K = {args.k} of M = {args.members} members, {args.draws} ensembles per candidate; cell: fail rate "
          "(median margin: statistic / threshold, > 1 fails) @ median first failing step")
    print(spread_table(study, args))
    results = evaluate(study, args)
    for kind in ("data", "weights"):
        for horizon in args.horizons:
            print(table(results, kind, horizon))
    summary = {f"{k}|{h}|{r}": row for (k, h, r), row in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.out and not args.reuse:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
