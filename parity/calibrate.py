"""`parity calibrate CASE`: measure each setup's error against a float64 oracle and propose tolerances.

The oracle is the case's reference setup with every dtype set to float64 (same mesh, same data,
the same seed weights cast up), run on CPU. Two setups that each sit within e of the truth can
differ by up to 2e, so the proposal is `multiple x` the largest error any setup showed against
the oracle (default 3: that 2e bound plus 50% headroom), but never below `floor`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from parity.core import records
from parity.core.errors import InputError
from parity.run.runner import RunOptions, resolve_device
from parity.case.schema import Case
from parity.case.trainer import BUILTIN
from parity.session import RunSession

ORACLE = "oracle_float64"
METRICS = ("loss", "grad_norm", "weights")


def oracle_setup(case: Case):
    ref = case.reference
    return replace(ref, name=ORACLE, param_dtype=None, reduce_dtype=None, train=replace(ref.train, dtype="float64"))


def _series(run_dir: Path, case: str, setup: str, metric: str) -> np.ndarray:
    """One row per step, or per parameter for weights: [norm] or [norm, sketch0, ...] when sketched."""
    run = records.read_setup_run(records.setup_dir(run_dir, case, setup))
    if metric == "weights":
        rows = run["weights"]
        columns = ("norm",) + (records.SKETCH_COLUMNS if all(c in r for r in rows for c in records.SKETCH_COLUMNS) else ())
        return np.array([[r[c] for c in columns] for r in rows])
    return run["metrics"][metric]


def errors_against_oracle(run_dir: Path, case: Case) -> dict[str, dict[str, float]]:
    """{setup: {metric: max relative error against the oracle}}

    For weights, the norms' and the sketches' errors, each relative to the oracle's norm: the
    weights lane bounds both with one rtol (parity.verdict.series.compare_weights).
    """
    out = {}
    for s in case.setups:
        if s.name == ORACLE:
            continue
        out[s.name] = {}
        for m in METRICS:
            truth, got = _series(run_dir, case.name, ORACLE, m), _series(run_dir, case.name, s.name, m)
            if m == "weights":
                n = min(truth.shape[1], got.shape[1])  # sketches only where both sides have them
                truth, got = truth[:, :n], got[:, :n]
                scale = np.abs(truth[:, :1])
            else:
                scale = np.abs(truth)
            out[s.name][m] = float(np.max(np.abs(got - truth) / scale))
    return out


def propose(errors: dict[str, dict[str, float]], multiple: float, floor: float) -> dict[str, float]:
    return {m: max(floor, multiple * max(e[m] for e in errors.values())) for m in METRICS}


def calibrate(case: Case, out: Path, steps: int | None, timeout_s: float, multiple: float, floor: float) -> str:
    """Run the case with its float64 oracle on CPU (a run session, not judged) and say what each setup's
    largest error against the oracle was and which tolerances that proposes."""
    if case.reference.trainer != BUILTIN:  # the oracle is parity's own model, recast to float64
        raise InputError(f"{case.path}: setups.{case.reference.name}.trainer: calibrate needs a built-in reference "
                         f"setup (its float64 oracle is parity's own model); allowed: cases whose first setup is built-in")
    calib = replace(case, setups=(oracle_setup(case),) + case.setups)
    session = RunSession(out, RunOptions(steps=steps, timeout_s=timeout_s))
    results = session.run([calib], {calib.name: resolve_device("cpu", calib)})[calib.name]
    failed = [f"{name}: {r.status}: {r.message.splitlines()[0]}" for name, r in results.items() if r.status != "ok"]
    if failed:
        return f"{case.name}: calibration run failed\n" + "\n".join(failed)
    return proposal_text(case, calib, session.out, multiple, floor)


def proposal_text(case: Case, calib: Case, out: Path, multiple: float, floor: float) -> str:
    """Each setup's largest error against the oracle in the run of `calib` under `out`, and the proposed
    [expect.tolerance] table."""
    errors = errors_against_oracle(out, calib)
    proposal = propose(errors, multiple, floor)
    lines = [f"{case.name}: max relative error against the float64 oracle ({out / case.name})",
             f"  {'setup':<28} " + " ".join(f"{m:>12}" for m in METRICS)]
    for name, e in errors.items():
        lines.append(f"  {name:<28} " + " ".join(f"{e[m]:12.3e}" for m in METRICS))
    lines.append(f"  proposed ({multiple:g} x largest error, floor {floor:g}):")
    lines.append("  [expect.tolerance]")
    for m in METRICS:
        lines.append(f"  {m} = {{ rtol = {proposal[m]:.1e}, atol = 0.0 }}")
    return "\n".join(lines)
