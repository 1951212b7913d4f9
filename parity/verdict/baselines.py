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

A comparison that fails records its triage (parity.verdict.triage): "drift" (not bitwise, every step
within tolerance) or "changed" (the numerics moved beyond it).

A baseline is only written from a case that passed (runner.judge). A missing baseline fails
(never a silent pass) and says which command creates it. Update modes (parity.verdict.update_modes,
the one list both front ends parse), after the pain points of other golden-file tools
(pytest-regressions' --force-regen surprise, pytest-mpl overwriting everything, syrupy's "new only"):

    None       never write a baseline
    "failing"  write missing and mismatching ones (the default when the flag is given bare)
    "new"      write missing baselines only; a mismatch still fails
    "all"      rewrite every baseline, matching or not
    "drift"    rewrite a mismatching baseline whose triage is drift, nothing else: a changed one still
               fails, and a missing one is not written (accepting drift must not also accept a setup that
               never had a baseline, which nobody has looked at yet; "new" is the mode for those)

A matching baseline is never rewritten except under "all", so its bytes and mtime stay put.

Writes are a full-file replace via a temporary file and rename (records.atomic_write_text): a
reader, or another pytest-xdist worker, sees the old file or the new one, never half of one.
Each baseline belongs to exactly one case, and a case is one test item, so no two workers write
the same file and no lock is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from parity.core import files
from parity.core.determinism import determinism_summary
from parity.core.fingerprint import differing_fields, platform_key
from parity.core.paths import check_platform, inside
from parity.core.records import RecordError, atomic_write_text, csv_text, read_csv, read_setup_run, rows_of, setup_dir
from parity.core.reproduce import pytest_case, shell
from parity.case.schema import Case, Setup
from parity.verdict import ensemble
from parity.verdict.case_verdict import load_runs
from parity.verdict.model import BaselineCheck, MetricResult, Pair, Triage
from parity.verdict.numbers import produced_unit, ulps_text
from parity.verdict.series import compare_series, not_compared
from parity.verdict.triage import DRIFT, localisation_note, triage
from parity.verdict.update_modes import REWRITING, UPDATE_MODES, WRITES_MISSING

DEFAULT_ROOT = Path("baselines")
COLUMNS = ("step", "loss", "grad_norm", "lr", "tokens")
REQUIRED = COLUMNS[:3]  # a setup run by its own command may not record lr or tokens
COMPARED = ("loss", "grad_norm")
PROVENANCE = ("torch", "device", "platform", "cpu_capability", "world_size", "mesh", "seed_checkpoint_sha256",
              "case_sha256", "date", "git_commit")
# Fingerprint fields recorded when the run has them (the GPU ones only on a GPU).
FINGERPRINT = ("cpu_model", "threads", "gpu", "gpu_count", "sm_count", "compute_capability", "cuda", "cudnn", "nccl", "driver")
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
        "git_commit": run.get("git_commit") or "unknown",  # the code under test (parity.core.provenance)
        "parity_version": run.get("parity_version") or "unknown",
        **({"parity_commit": run["parity_commit"]} if run.get("parity_commit") else {}),
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
    return (f"`parity run {case.path} --update-baselines={mode}` "
            f"(or `{shell(pytest_case(case.name, f'--parity-update-baselines={mode}'))}`)")


@dataclass
class BaselineComparison:
    """One setup's run against its stored baseline, before anything is written: what the write policy
    (`write_policy`) rules on. `state`: "unjudged" (the run failed or has NaN/Inf: `reason` says which),
    "missing", "unreadable" (`reason`: the read error) or "compared"."""
    setup: str
    path: Path
    platform: str
    state: str
    reason: str = ""
    provenance: dict = field(default_factory=dict)  # the run's, for a baseline written from it
    basis: str = "exact"  # compared "exact", within "tolerance", or "statistical" (BaselineCheck.basis)
    metrics: dict[str, MetricResult] = field(default_factory=dict)
    shortened: str = ""  # " (its first n of m steps)" where the run made fewer steps than the baseline
    # The run stopped before its case's last step (a --steps override): what it lacks is unverified, so it
    # replaces no baseline. A case made shorter, run in full, may replace the longer baseline of its old size.
    cut_short: bool = False
    not_exact_because: str = ""  # where not exact, the fields in which baseline and run differ
    triage: Triage | None = None  # why a compared baseline failed (parity.verdict.triage)

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.metrics.values())

    @property
    def drift(self) -> bool:
        """Whether it failed by environment drift only."""
        return self.triage is not None and self.triage.kind == DRIFT

    def difference(self) -> str:
        """The failing metrics' first differences, in one line."""
        return "; ".join(_difference(self.setup, m, metric, self.basis)
                        for metric, m in self.metrics.items() if not m.passed)


def compare_baseline(case: Case, name: str, records: dict, root, platform: str, torch_version: str,
                     members: list[dict], run_dir, pairs: list[Pair] = ()) -> BaselineComparison:
    """One setup's run (its records, as read_setup_run returns them) against its baseline; writes nothing.
    `members`: a statistical case's ensemble runs, whose spread judges a baseline made where the bits differ;
    `run_dir`: where the run is; `pairs`: the case's, named by a changed triage where their probes localised
    something."""
    path = baseline_path(root, case.name, name, platform)
    found = partial(BaselineComparison, name, path, platform)
    run, columns = records["info"], records["metrics"]
    if run["status"] != "ok":
        return found("unjudged", f"run status is {run['status']!r}")
    bad = columns["step"][~np.logical_and.reduce([np.isfinite(columns[m]) for m in COMPARED])].tolist()
    if bad:
        return found("unjudged", f"the run has NaN/Inf at steps {bad}")
    prov = provenance(run, case, name, platform)
    if not path.exists():
        return found("missing", provenance=prov)
    try:
        header, base = read_baseline(path)
    except RecordError as e:
        return found("unreadable", str(e), prov)
    mine = {**prov, "torch": torch_version}
    differ = differing_fields(platform, header, mine)
    exact = header.get("platform") == platform and not differ
    # A run may be shorter than its baseline (pytest --parity-steps): compare the steps it made.
    # It must not be longer: steps the baseline lacks are unverified.
    last = int(columns["step"][-1]) if len(columns["step"]) else 0
    declared = case.setup(name).train.steps
    stored = len(base)
    base = [r for r in base if r["step"] <= last]
    metrics = {m: compare_series([r["step"] for r in base], [r[m] for r in base], columns["step"], columns[m],
                                 case.expect.tolerance[m], "bitwise" if exact else "tolerance", ("baseline", "run"),
                                 unit=produced_unit(case.setups))
               for m in COMPARED}
    basis = "exact" if exact else "tolerance"
    if case.expect.statistical and not exact:
        basis, metrics = "statistical", _drift(case, base, columns, members, metrics)
    judged = {"tolerance": "within tolerance", "statistical": "as two draws of the ensemble"}.get(basis)
    because = "" if exact else (" (baseline and run differ in " + ", ".join(
        f"{k}: {header.get(k, 'not recorded')} vs {mine.get(k, 'not recorded')}"
        for k in (differ or ["platform"])) + f": compared {judged})")
    where = localisation_note(name, records.get("probes") is not None, header.get("git_commit"), list(pairs),
                              f"`{shell(['parity', 'locate', str(run_dir), case.name])}`")
    return found("compared", provenance=prov, basis=basis, metrics=metrics, not_exact_because=because,
                 shortened=f" (its first {len(base)} of {stored} steps)" if len(base) < stored else "",
                 cut_short=last < declared,
                 triage=triage(basis, metrics, where))


def write_policy(c: BaselineComparison, update: str | None, case: Case, run_dir) -> tuple[str, bool, Path | None, str]:
    """The write policy: (status, passed, the file to write from the run or None, message) for a comparison
    under an update mode. A matching baseline is rewritten only under "all"; a mismatching one under "failing"
    and "all", and under "drift" where its triage is drift; a run cut short never replaces a baseline.
    An unreadable baseline no mode may rewrite is bad input (RecordError)."""
    if c.state == "unjudged":
        return "error", False, None, f"{c.reason}; not compared, nothing written"
    if c.state == "missing":
        if update not in WRITES_MISSING:
            refused = f"; update mode {update} writes no missing baseline" if update else ""
            return ("missing", False, None,
                    f"no baseline {c.path} for platform {c.platform}{refused}; create it with {create_commands(case)}")
        return "updated", True, c.path, f"wrote new baseline {c.path}"
    if c.state == "unreadable":
        if update in REWRITING:
            return "updated", True, c.path, f"rewrote unreadable baseline {c.path} ({c.reason})"
        raise RecordError(f"{c.reason}; fix or recreate it with {create_commands(case, 'failing')}")
    if c.passed:
        if update == "all" and not c.cut_short:
            return "updated", True, c.path, f"matches; rewrote {c.path} (update mode all)"
        return "match", True, None, f"matches {c.path}{c.shortened}{c.not_exact_because}"
    if (update in REWRITING or (update == "drift" and c.drift)) and not c.cut_short:
        return "updated", True, c.path, f"rewrote {c.path} (update mode {update}); it differed: {c.difference()}"
    obtained = obtained_path(run_dir, case.name, c.setup)
    if c.cut_short and update:
        accept = ("not rewritten: the run made fewer steps than its case declares (a --steps override); "
                  "rerun all steps to update it")
    elif update == "drift":
        accept = (f"update mode drift refused it: the numerics changed, not only the environment's last bits; "
                  f"accept them with {create_commands(case, 'failing')}")
    else:
        accept = f"accept them with {create_commands(case, 'drift' if c.drift else 'failing')}"
    return ("mismatch", False, obtained, f"differs from {c.path}{c.shortened}{c.not_exact_because}: "
            f"{c.difference()}; obtained values in {obtained}; {accept}")


def check_baseline(case: Case, setup: Setup | str, run_dir, root, platform: str, torch_version: str,
                   update: str | None = None, records: dict | None = None,
                   members: list[dict] | None = None, pairs: list[Pair] = ()) -> BaselineCheck:
    """Compare one setup's run with its baseline (compare_baseline), then write what the update mode allows
    (write_policy): the baseline, or an obtained file beside the run. `records`: the run's records as read_setup_run
    returns them, where the caller has read them already; `pairs`: the case's, for a changed triage to point to."""
    if update is not None and update not in UPDATE_MODES:
        raise ValueError(f"update mode {update!r}; allowed: {', '.join(UPDATE_MODES)} (or none)")
    name = setup if isinstance(setup, str) else setup.name
    records = records if records is not None else read_setup_run(setup_dir(run_dir, case.name, name))
    comparison = compare_baseline(case, name, records, root, platform, torch_version, members or [], run_dir, pairs)
    status, passed, target, message = write_policy(comparison, update, case, run_dir)
    if target is not None:
        write_baseline(target, rows_of(records["metrics"]), comparison.provenance)
    obtained = target if status == "mismatch" else None
    return _check(name, comparison.path, platform, status, comparison.basis, passed, message, comparison.metrics,
                  obtained, comparison.triage)


def _check(setup, path, platform, status, basis, passed, message, metrics=None, obtained=None,
           triaged: Triage | None = None) -> BaselineCheck:
    return BaselineCheck(setup=setup, path=str(path) if path else None, platform=platform, status=status, basis=basis,
                         passed=passed, metrics=metrics or {m: not_compared(message) for m in COMPARED},
                         message=message, obtained=str(obtained) if obtained else None, triage=triaged)


def _drift(case: Case, base: list[dict], columns: dict, members: list[dict], metrics: dict) -> dict:
    """Statistical mode, where the bits differ (another CPU instruction set): over hundreds of steps a run
    drifts from its baseline as far as the ensemble's members drift from each other, so each window's
    difference is judged by the ensemble's spread (parity.verdict.ensemble.drift), not by a per-step tolerance."""
    steps = columns["step"]
    healthy = [r for r in members if not r["problems"]]
    out = {}
    for m in COMPARED:
        base_values = ensemble.series_at({"metrics": {"step": np.array([r["step"] for r in base]),
                                                      m: np.array([r[m] for r in base], dtype=np.float64)}}, m, steps)
        if not healthy or len(healthy) < len(members):
            out[m] = replace(metrics[m], passed=False, statistical=None,
                             problems=metrics[m].problems + ["the ensemble did not finish: no spread to judge by"])
            continue
        t = ensemble.drift(base_values, columns[m], [ensemble.series_at(r, m, steps) for r in members], m,
                           case.expect.statistical, case.expect.tolerance[m])
        out[m] = replace(metrics[m], passed=t.passed, statistical=t)
    return out


def _difference(setup: str, m: MetricResult, metric: str, basis: str) -> str:
    if m.problems:
        return f"{setup} {metric}: " + "; ".join(m.problems)
    if basis == "statistical":
        e = m.statistical.first_failure
        return (f"{setup} {metric} steps {e['window'][0]}-{e['window'][1]}: baseline median {e['value_ref']!r}, run "
                f"{e['value_other']!r} (rel {e['rel']:.3g}, z {e['z']:.3g}, limit {e['limit']:.3g})")
    e = m.first_not_bitwise if basis == "exact" else m.first_beyond_tolerance
    return (f"{setup} {metric} step {e['step']}: baseline {e['value_ref']!r}, run {e['value_other']!r} "
            f"(abs {e['abs']:.3g}, rel {e['rel']:.3g}, {ulps_text(e)})")


def check_case_baselines(case: Case, run_dir, root=None, update: str | None = None,
                         runs: dict[str, dict] | None = None, pairs: list[Pair] = ()) -> list[BaselineCheck]:
    """check_baseline for every setup, with platform and torch version from its run.json; `runs`: every
    setup's records (case_verdict.load_runs), where the caller has read them already; `pairs`: the case's
    verdict between setups, where it has one."""
    runs = runs if runs is not None else load_runs(case, run_dir)
    members = [runs[m.name] for m in case.ensemble]
    results = []
    for s in case.setups:
        run = runs[s.name]["info"]
        platform = run.get("platform") or platform_key(str(run.get("device", "")))
        try:
            results.append(check_baseline(case, s, run_dir, root, platform, run.get("torch", "unknown"), update,
                                          runs[s.name], members, pairs))
        except OSError as e:  # a read-only or full disk under the baseline root: this setup fails, the rest go on
            path = baseline_path(root, case.name, s.name, platform)
            results.append(_check(s.name, path, platform, "error", "exact", False,
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
    if update in REWRITING:
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
