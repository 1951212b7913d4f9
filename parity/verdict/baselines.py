"""Stored baselines: `baselines/<case>/<setup>.<platform>.csv`, one per setup and hardware class.

A baseline is the metrics.csv of a known-good run (step, loss, grad_norm, lr, tokens) with
`# key: value` provenance lines on top (the run's fingerprint among them), floats in full `repr`
precision. A run is compared with the baseline for its platform (parity.core.fingerprint.platform_key):

- exactly (bit for bit) when every field that changes bits matches
  (parity.core.fingerprint.BIT_FIELDS: torch and, on CPU, the CPU model, instruction set and thread count; on a
  GPU the model, SM count, compute capability, CUDA, cuDNN, NCCL, driver and determinism
  settings), since then nothing but our code can have changed the numbers;
- otherwise within the case's tolerances (case.expect.tolerance), because a torch or hardware
  change legitimately moves the last bits; the message names the fields that differ.

A baseline is only written from a case that passed (runner.judge). A missing baseline fails
(never a silent pass) and says which command creates it. Update modes, after the pain points of
other golden-file tools (pytest-regressions' --force-regen surprise, pytest-mpl overwriting
everything, syrupy's "new only"):

    None       never write a baseline
    "new"      write missing baselines only; a mismatch still fails
    "failing"  write missing and mismatching ones (the default when the flag is given bare)
    "all"      rewrite every baseline, matching or not

A matching baseline is never rewritten except under "all", so its bytes and mtime stay put.

Writes are a full-file replace via a temporary file and rename (records.atomic_write_text): a
reader, or another pytest-xdist worker, sees the old file or the new one, never half of one.
Each baseline belongs to exactly one case, and a case is one test item, so no two workers write
the same file and no lock is needed.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from parity.core import files
from parity.verdict.compare import compare_series, load_runs, not_compared, ulps_text
from parity.core.fingerprint import determinism_summary, differing_fields, platform_key
from parity.core.paths import check_platform, inside
from parity.core.records import RecordError, atomic_write_text, csv_text, read_csv, read_setup_run, rows_of, setup_dir
from parity.case.spec import Case, Setup

DEFAULT_ROOT = Path("baselines")
COLUMNS = ("step", "loss", "grad_norm", "lr", "tokens")
REQUIRED = COLUMNS[:3]  # a setup run by its own command may not record lr or tokens
COMPARED = ("loss", "grad_norm")
PROVENANCE = ("torch", "device", "platform", "cpu_capability", "world_size", "mesh", "seed_checkpoint_sha256",
              "case_sha256", "date", "git_commit")
# Fingerprint fields recorded when the run has them (the GPU ones only on a GPU).
FINGERPRINT = ("cpu_model", "threads", "gpu", "gpu_count", "sm_count", "compute_capability", "cuda", "cudnn", "nccl", "driver")
UPDATE_MODES = (None, "new", "failing", "all")
# A double written with repr needs ~15-17 significant digits unless it is a short dyadic number
# (0.5, 2.25). A loss or grad-norm column where *every* value has at most this many digits was
# almost surely rounded on the way in (Megatron's 5-decimal goldens have 6-7, "%.9g" float32
# printing has 9), and rounding quietly turns an exact check into an approximate one.
ROUNDED_DIGITS = 10
ROUNDED_MIN_ROWS = 3


def baseline_path(root, case_name: str, setup_name: str, platform: str) -> Path:
    root = root if root is not None else DEFAULT_ROOT
    return inside(root, case_name, f"{setup_name}.{check_platform(platform)}.csv")


def obtained_path(run_dir, case_name: str, setup_name: str) -> Path:
    return inside(run_dir, case_name, f"{setup_name}.obtained.csv")


def baseline_text(metrics_rows, provenance: dict) -> str:
    header = [f"{k}: {provenance.get(k, '')}" for k in PROVENANCE]
    header += [f"{k}: {v}" for k, v in provenance.items() if k not in PROVENANCE]
    if any("\n" in line for line in header):
        raise ValueError("provenance values must be single lines")
    return csv_text([c for c in COLUMNS if not metrics_rows or c in metrics_rows[0]], metrics_rows, header)


def write_baseline(path, metrics_rows, provenance: dict) -> None:
    """Write a baseline (or an obtained file) atomically: provenance lines, then the rows."""
    atomic_write_text(path, baseline_text(metrics_rows, provenance))


def provenance(run: dict, case: Case, setup_name: str, platform: str) -> dict:
    """Provenance lines for a baseline made from a run's run.json."""
    shape, names = run.get("mesh_shape"), run.get("mesh_dim_names")
    mesh = "x".join(f"{n}={s}" for n, s in zip(names, shape)) if shape and names else str(shape or "none")
    fp = run.get("fingerprint") or {}
    settings = (run.get("determinism") or {}).get("settings")
    return {
        "torch": run.get("torch", "unknown"),
        "device": run.get("device", "unknown"),
        "platform": platform,
        "cpu_capability": fp.get("cpu_capability") or run.get("cpu_capability", "unknown"),
        "world_size": run.get("world_size", "unknown"),
        "mesh": mesh,
        "seed_checkpoint_sha256": run.get("seed_checkpoint_sha256") or "none",
        "case_sha256": run.get("case_sha256") or case.sha256,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": run.get("git_commit") or "unknown",
        **{k: fp[k] for k in FINGERPRINT if fp.get(k) is not None},
        **({"determinism": determinism_summary(settings)} if settings else {}),
        **{k: run[k] for k in trainer_fields(case, setup_name) if run.get(k)},
        "case": case.name,
        "setup": setup_name,
    }


def trainer_fields(case: Case, setup_name: str) -> tuple[str, ...]:
    """The run.json fields that say which training stack made a setup's run: `trainer`, which a setup run by
    another trainer records, and the fields that trainer names (Setup.external's record_fields)."""
    setup = next((s for s in case.setups if s.name == setup_name), None)
    external = setup.external if setup is not None and setup.external else {}
    return ("trainer", *external.get("record_fields", ()))


def create_commands(case: Case, mode: str = "new") -> str:
    from parity.core.reproduce import pytest_case, shell

    return (f"`parity run {case.path} --update-baselines={mode}` "
            f"(or `{shell(pytest_case(case.name, f'--parity-update-baselines={mode}'))}`)")


def _result(setup, path, platform, status, how, passed, message, metrics=None, obtained=None) -> dict:
    return {"setup": setup, "path": str(path) if path else None, "platform": platform, "status": status, "how": how,
            "passed": passed, "metrics": metrics or {m: not_compared(message) for m in COMPARED},
            "message": message, "obtained": str(obtained) if obtained else None}


def check_baseline(case: Case, setup: Setup | str, run_dir, root, platform: str, torch_version: str,
                   update: str | None = None, records: dict | None = None, members: list[dict] | None = None) -> dict:
    """Compare one setup's run with its baseline, writing files as `update` allows; returns B. `records`:
    the run's records as read_setup_run returns them, where the caller has read them already. `members`:
    a statistical case's ensemble runs, whose spread judges a baseline made where the bits differ."""
    if update not in UPDATE_MODES:
        raise ValueError(f"update mode {update!r}; allowed: new, failing, all (or none)")
    name = setup if isinstance(setup, str) else setup.name
    path = baseline_path(root, case.name, name, platform)
    result = partial(_result, name, path, platform)
    records = records if records is not None else read_setup_run(setup_dir(run_dir, case.name, name))
    run, columns = records["info"], records["metrics"]
    if run["status"] != "ok":
        return result("error", "exact", False, f"run status is {run['status']!r}; not compared, nothing written")
    bad = columns["step"][~np.logical_and.reduce([np.isfinite(columns[m]) for m in COMPARED])].tolist()
    if bad:
        return result("error", "exact", False, f"the run has NaN/Inf at steps {bad}; not compared, nothing written")
    prov = provenance(run, case, name, platform)

    def write(to: Path) -> None:
        write_baseline(to, rows_of(columns), prov)

    if not path.exists():
        if update is None:
            return result("missing", "exact", False,
                          f"no baseline {path} for platform {platform}; create it with {create_commands(case)}")
        write(path)
        return result("updated", "exact", True, f"wrote new baseline {path}")
    try:
        header, base = read_baseline(path)
    except RecordError as e:
        if update in ("failing", "all"):
            write(path)
            return result("updated", "exact", True, f"rewrote unreadable baseline {path} ({e})")
        raise RecordError(f"{e}; fix or recreate it with {create_commands(case, 'failing')}") from None

    mine = {**prov, "torch": torch_version}
    differ = differing_fields(platform, header, mine)
    exact = header.get("platform") == platform and not differ
    how = "exact" if exact else "tolerance"
    # A run may be shorter than its baseline (pytest --parity-steps): compare the steps it made.
    # It must not be longer: steps the baseline lacks are unverified.
    last = int(columns["step"][-1]) if len(columns["step"]) else 0
    stored = len(base)
    base = [r for r in base if r["step"] <= last]
    part = f" (its first {len(base)} of {stored} steps)" if len(base) < stored else ""
    labels = ("baseline", "run")
    metrics = {m: compare_series([r["step"] for r in base], [r[m] for r in base], columns["step"], columns[m],
                                 case.expect.tolerance[m],
                                 "bitwise" if exact else "tolerance", labels) for m in COMPARED}
    if case.expect.statistical and not exact:
        how = "statistical"
        metrics = _drift(case, base, columns, members or [], metrics)
    judged = {"tolerance": "within tolerance", "statistical": "as two draws of the ensemble"}.get(how)
    why = "" if exact else (" (baseline and run differ in " + ", ".join(
        f"{k}: {header.get(k, 'not recorded')} vs {mine.get(k, 'not recorded')}"
        for k in (differ or ["platform"])) + f": compared {judged})")
    if all(m["passed"] for m in metrics.values()):
        if update == "all" and not part:
            write(path)
            return result("updated", how, True, f"matches; rewrote {path} (update mode all)", metrics)
        return result("match", how, True, f"matches {path}{part}{why}", metrics)

    diff = "; ".join(_difference(name, m, metric, how) for metric, m in metrics.items() if not m["passed"])
    if exact and all(m["within_tolerance"] for m in metrics.values()):
        diff += " (every step is within the case tolerance: bit-level drift, not a large change)"
    # A shortened run (--parity-steps) never replaces a longer baseline, whatever the mode.
    if update in ("failing", "all") and not part:
        write(path)
        return result("updated", how, True, f"rewrote {path}; it differed: {diff}", metrics)
    obtained = obtained_path(run_dir, case.name, name)
    write(obtained)
    accept = ("not rewritten: the run made fewer steps than the baseline; rerun all steps to update it"
              if part and update else f"accept them with {create_commands(case, 'failing')}")
    return result("mismatch", how, False,
                  f"differs from {path}{part}{why}: {diff}; obtained values in {obtained}; {accept}",
                  metrics, obtained)


def _drift(case: Case, base: list[dict], columns: dict, members: list[dict], metrics: dict) -> dict:
    """Statistical mode, where the bits differ (another CPU instruction set): over hundreds of steps a run
    drifts from its baseline as far as the ensemble's members drift from each other, so each window's
    difference is judged by the ensemble's spread (parity.verdict.ensemble.drift), not by a per-step tolerance."""
    from parity.verdict import ensemble

    steps = columns["step"]
    healthy = [r for r in members if not r["problems"]]
    out = {}
    for m in COMPARED:
        base_values = ensemble.series_at({"metrics": {"step": np.array([r["step"] for r in base]),
                                                      m: np.array([r[m] for r in base], dtype=np.float64)}}, m, steps)
        if not healthy or len(healthy) < len(members):
            out[m] = {**metrics[m], "passed": False, "statistical": None,
                      "problems": metrics[m]["problems"] + ["the ensemble did not finish: no spread to judge by"]}
            continue
        t = ensemble.drift(base_values, columns[m], [ensemble.series_at(r, m, steps) for r in members], m,
                           case.expect.statistical, case.expect.tolerance[m])
        out[m] = {**metrics[m], "passed": t["passed"], "statistical": t}
    return out


def _difference(setup: str, m: dict, metric: str, how: str) -> str:
    if m["problems"]:
        return f"{setup} {metric}: " + "; ".join(m["problems"])
    if how == "statistical":
        e = m["statistical"]["first_failure"]
        return (f"{setup} {metric} steps {e['window'][0]}-{e['window'][1]}: baseline median {e['value_ref']!r}, run "
                f"{e['value_other']!r} (rel {e['rel']:.3g}, z {e['z']:.3g}, limit {e['limit']:.3g})")
    e = m["first_divergence"] if how == "exact" else m["first_tolerance_failure"]
    return (f"{setup} {metric} step {e['step']}: baseline {e['value_ref']!r}, run {e['value_other']!r} "
            f"(abs {e['abs']:.3g}, rel {e['rel']:.3g}, {ulps_text(e)})")


def check_case_baselines(case: Case, run_dir, root=None, update: str | None = None,
                         runs: dict[str, dict] | None = None) -> list[dict]:
    """check_baseline for every setup, with platform and torch version from its run.json; `runs`: every
    setup's records (compare.load_runs), where the caller has read them already."""
    runs = runs if runs is not None else load_runs(case, run_dir)
    members = [runs[m.name] for m in case.ensemble]
    results = []
    for s in case.setups:
        run = runs[s.name]["info"]
        platform = run.get("platform") or platform_key(str(run.get("device", "")))
        try:
            results.append(check_baseline(case, s, run_dir, root, platform, run.get("torch", "unknown"), update,
                                          runs[s.name], members))
        except OSError as e:  # a read-only or full disk under the baseline root: this setup fails, the rest go on
            path = baseline_path(root, case.name, s.name, platform)
            results.append(_result(s.name, path, platform, "error", "exact", False,
                                   f"{path}: cannot write it ({e.strerror or e})"))
    return results


def read_baseline(path: Path) -> tuple[dict[str, str], list[dict]]:
    """(provenance, rows) of a baseline file, refused when its provenance contradicts its file name.

    The platform in the name decides which runs it is compared with and whether exactly, so a
    file whose header claims another platform must not quietly switch an exact check to tolerance.
    """
    header, rows = read_csv(path, REQUIRED)
    parts = _split_name(path)
    if parts is None:
        raise RecordError(f"{path}: the file name is not <setup>.<platform>.csv")
    if header.get("platform") != parts[1]:
        raise RecordError(f"{path}:1: provenance says platform {header.get('platform')!r} but the file name says "
                          f"{parts[1]!r}; allowed: the same platform in both")
    return header, rows


def check_case_files(case: Case, root, update: str | None) -> None:
    """Every stored baseline of the case is readable: checked before anything runs (bad input, exit 2).

    Under update modes that rewrite failing baselines, an unreadable one is left to be rewritten.
    """
    if update in ("failing", "all"):
        return
    folder = Path(root if root is not None else DEFAULT_ROOT) / case.name
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else ():
        parts = _split_name(path)
        if parts is not None and parts[0] in {s.name for s in case.setups}:
            try:
                read_baseline(path)
            except RecordError as e:
                raise RecordError(f"{e}; fix or recreate it with {create_commands(case, 'failing')}") from None


def _split_name(path: Path) -> tuple[str, str] | None:
    stem = path.name[: -len(".csv")]
    setup, dot, platform = stem.rpartition(".")
    return (setup, platform) if dot and setup and platform else None


def baseline_files(root=None) -> list[Path]:
    return sorted(Path(root if root is not None else DEFAULT_ROOT).glob("*/*.csv"))


def unused_baselines(root, cases: list[Case]) -> list[Path]:
    """Baseline files whose case or setup no longer exists (or whose name is not setup.platform.csv)."""
    known = {c.name: {s.name for s in c.setups} for c in cases}
    unused = []
    for path in baseline_files(root):
        parts = _split_name(path)
        if parts is None or parts[0] not in known.get(path.parent.name, ()):
            unused.append(path)
    return unused


def _data_lines(path: Path) -> list[int]:
    """Line numbers of the data rows, in the order read_csv returns them."""
    numbers = [i for i, line in enumerate(files.read_text(path).splitlines(), 1) if not line.startswith("#")]
    return numbers[1:]  # the first non-comment line is the column header


def _significant_digits(x: float) -> int:
    mantissa = repr(abs(x)).split("e")[0].replace(".", "")
    return len(mantissa.strip("0")) or 1


def lint(root=None) -> list[str]:
    """Problems in the stored baselines, one line each naming file and line."""
    folder = Path(root if root is not None else DEFAULT_ROOT)
    if not folder.is_dir():
        raise RecordError(f"{folder}: no such directory; allowed: the baseline root (default {DEFAULT_ROOT})")
    problems = []
    for path in baseline_files(root):
        try:
            header, rows = read_csv(path)
        except RecordError as e:
            problems.append(str(e))
            continue
        missing = [k for k in PROVENANCE if not header.get(k)]
        if missing:
            problems.append(f"{path}:1: missing provenance: {', '.join(missing)}")
        parts = _split_name(path)
        if parts and header.get("platform") and header["platform"] != parts[1]:
            problems.append(f"{path}:1: provenance platform {header['platform']!r} but the file name says {parts[1]!r}")
        lines = _data_lines(path)
        absent = [c for c in REQUIRED if rows and c not in rows[0]]
        if absent or not rows:
            problems.append(f"{path}:{lines[0] if lines else 1}: " +
                            (f"missing columns: {', '.join(absent)}" if absent else "no data rows"))
            continue
        previous = None
        for row, line in zip(rows, lines):
            for column in ("loss", "grad_norm", "lr"):
                if column in row and not math.isfinite(row[column]):
                    problems.append(f"{path}:{line}: {column} is {row[column]!r}")
            if previous is not None and row["step"] <= previous:
                problems.append(f"{path}:{line}: step {row['step']} does not increase (after {previous})")
            previous = row["step"]
        for column in COMPARED:
            digits = [_significant_digits(r[column]) for r in rows]
            # A short value that is a short binary fraction (7.5, 7.25) can be a real result; a short
            # decimal that is not (8.07496) was rounded on the way in.
            short = [(line, r[column], d) for r, line, d in zip(rows, lines, digits)
                     if d <= ROUNDED_DIGITS and not (r[column] * 2**20).is_integer()]
            if len(rows) >= ROUNDED_MIN_ROWS and len(short) == len(rows):
                problems.append(f"{path}:{lines[0]}: {column} looks rounded: every value has at most "
                                f"{max(digits)} significant digits; store full repr precision")
            elif short:  # one hand-edited or pasted value turns that step's exact check into an approximate one
                line, value, d = short[0]
                problems.append(f"{path}:{line}: {column} {value!r} has only {d} significant digits "
                                f"({len(short)} such value(s) in this column): rounded? store full repr precision")
    return problems
