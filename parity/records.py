"""The files a run leaves behind, written atomically and read back bit-exactly.

metrics.csv  step,loss,grad_norm,lr,tokens,step_time_s   one row per optimizer step (1-based); a run made
             by another training command has the columns it recorded (step, loss, grad_norm at least)
weights.csv  param,norm,sha256,sketch0..sketch3          one row per parameter (full tensor); the
             sketches are random projections of the logical tensor (parity.train.weight_sketches)
probes.csv   step,phase,name,stat,value                    logical probes (parity.probes), in causal order:
             per probed step, forward modules in execution order, then gradients in backward
             order, then updates; absent for runs made without them (other trainers, older runs)
run.json     provenance of one setup's run ("weights_recorded": false where a command left no final weights)

Floats are written with `repr`, which round-trips every IEEE double exactly; they are parsed
with `float`, never through a lossy text-to-float path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from parity.errors import InputError
from parity.paths import inside

# loss_rounding, grad_norm_rounding: how far a value read from rounded log text may be from the
# true one (half a unit of its last printed place); absent where the values are exact.
METRIC_COLUMNS = ("step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "loss_rounding", "grad_norm_rounding")
METRIC_REQUIRED = METRIC_COLUMNS[:3]
# Files written before the sketches lack their columns and still read (compare then judges norms only).
WEIGHT_REQUIRED = ("param", "norm", "sha256")
SKETCH_COLUMNS = ("sketch0", "sketch1", "sketch2", "sketch3")  # how many sketches train computes, too
WEIGHT_COLUMNS = WEIGHT_REQUIRED + SKETCH_COLUMNS
PROBE_COLUMNS = ("step", "phase", "name", "stat", "value")
PROBE_PHASES = ("forward", "backward", "update")
INT_COLUMNS = {"step", "tokens"}
STR_COLUMNS = {"param", "sha256", "phase", "name", "stat"}
# run.json "status": ok (rank 0 wrote every record), or why the runner wrote it in its place.
RUN_STATUSES = ("ok", "failed", "timeout", "interrupted")


class RecordError(InputError):
    """A record file that cannot be read; the message names the file and the line."""


@contextmanager
def atomic_open(path: str | Path, mode: str = "w"):
    """A file object whose contents appear at `path` whole, on success only: a temporary file in the
    same directory, renamed over `path`. Readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a team's shared report must stay readable
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def format_value(value) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest string that parses back to the same double; 'nan', 'inf' too
    return str(value)


def csv_text(columns, rows, header_lines=()) -> str:
    buf = io.StringIO()
    for line in header_lines:
        buf.write(f"# {line}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_value(row[c]) for c in columns])
    return buf.getvalue()


def write_csv(path, columns, rows, header_lines=()) -> None:
    atomic_write_text(path, csv_text(columns, rows, header_lines))


def read_csv(path: str | Path, required=()) -> tuple[dict[str, str], list[dict]]:
    """Returns (the `# key: value` header lines, the rows with ints, floats and strings parsed).

    `required` names the columns the caller reads: a file without one of them is a RecordError.
    """
    path = Path(path)
    header: dict[str, str] = {}
    rows: list[dict] = []
    columns = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RecordError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RecordError(f"{path}: not a text file (binary content); expected CSV") from None
    for lineno, line in enumerate(lines, 1):
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if not sep:
                raise RecordError(f"{path}:{lineno}: header line is not '# key: value'")
            header[key.strip()] = value.strip()
            continue
        try:
            cells = next(csv.reader([line]))
        except (csv.Error, StopIteration) as e:
            raise RecordError(f"{path}:{lineno}: not a CSV line ({e})") from None
        if columns is None:
            columns = cells
            if missing := [c for c in required if c not in columns]:
                raise RecordError(f"{path}:{lineno}: missing column(s) {', '.join(missing)}; "
                                  f"the header has {','.join(columns)}")
            continue
        if len(cells) != len(columns):
            raise RecordError(f"{path}:{lineno}: {len(cells)} fields, expected {len(columns)} ({','.join(columns)})")
        row = {}
        for name, cell in zip(columns, cells):
            try:
                row[name] = cell if name in STR_COLUMNS else int(cell) if name in INT_COLUMNS else float(cell)
            except ValueError:
                raise RecordError(f"{path}:{lineno}: column {name!r}: {cell!r} is not a number") from None
        rows.append(row)
    if columns is None:
        raise RecordError(f"{path}: no header row")
    return header, rows


def write_metrics(path, rows) -> None:
    """The columns the rows have, in METRIC_COLUMNS order (a command may not record lr, tokens or times)."""
    write_csv(path, [c for c in METRIC_COLUMNS if rows and c in rows[0]] or METRIC_REQUIRED, rows)


def read_metrics(path) -> list[dict]:
    return read_csv(path, METRIC_REQUIRED)[1]


def write_weights(path, rows) -> None:
    """Rows with sketches (what ranks write) or, all of them, without (the older layout)."""
    with_sketches = [all(c in r for c in SKETCH_COLUMNS) for r in rows]
    if any(with_sketches) and not all(with_sketches):
        raise ValueError("weights rows: some have sketch columns and some do not")
    write_csv(path, WEIGHT_COLUMNS if all(with_sketches) and rows else WEIGHT_REQUIRED, rows)


def read_weights(path) -> list[dict]:
    return read_csv(path, WEIGHT_REQUIRED)[1]


def write_probes(path, rows) -> None:
    write_csv(path, PROBE_COLUMNS, rows)


def read_probes(path) -> list[dict]:
    rows = read_csv(path, PROBE_COLUMNS)[1]
    for i, r in enumerate(rows, 2):
        if r["phase"] not in PROBE_PHASES:
            raise RecordError(f"{path}:{i}: phase {r['phase']!r}; allowed: {', '.join(PROBE_PHASES)}")
    return rows


def _jsonable(value):
    # JSON has no NaN/Inf; write them as strings so the file stays standard and nothing is lost.
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path) -> dict:
    """A JSON object; anything else (binary, `[]`, `null`) is a RecordError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise RecordError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(value, dict):
        raise RecordError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_setup_run(directory: str | Path, lenient: bool = False) -> dict:
    """The one reader of a setup's run records: {"info": run.json, "metrics": rows, "weights": rows,
    "probes": rows or None (a run made without probes)}.

    A run whose status is not "ok" has no metrics or weights to read (None). Strict (the default,
    for compare, baselines, calibrate and the CLI table): a record that is missing or malformed
    where the run says it finished is a RecordError, i.e. bad input. Lenient (for reports, which
    draw whatever a run directory holds): what cannot be read is left empty.
    """
    directory = Path(directory)
    run = {"info": {}, "metrics": None, "weights": None, "probes": None}
    try:
        run["info"] = read_json(directory / "run.json")
        status = run["info"].get("status")
        if status not in RUN_STATUSES:
            raise RecordError(f"{directory / 'run.json'}: status {status!r}; allowed: {', '.join(RUN_STATUSES)}")
        if status == "ok":
            run["metrics"] = read_metrics(directory / "metrics.csv")
            if run["info"].get("weights_recorded", True):
                run["weights"] = read_weights(directory / "weights.csv")
            if (directory / "probes.csv").is_file():
                run["probes"] = read_probes(directory / "probes.csv")
    except RecordError:
        if not lenient:
            raise
        if run["metrics"] is None and (directory / "metrics.csv").is_file():
            try:  # a failed or unreadable run may still have written the steps it made
                run["metrics"] = read_metrics(directory / "metrics.csv")
            except RecordError:
                pass
    return run


def setup_dir(out: str | Path, case: str, setup: str) -> Path:
    return inside(out, case, setup)


RECORD_FILES = ("metrics.csv", "weights.csv", "probes.csv")  # what a run records besides run.json


def copy_run(source: str | Path, dest: str | Path, run_updates: dict) -> None:
    """A finished run's records, byte for byte, under another case or setup name: run.json last (it
    marks the copy finished), with `run_updates` (the new names, provenance and where it was trained)."""
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (source / name).is_file():
            with atomic_open(dest / name, "wb") as f:
                f.write((source / name).read_bytes())
    write_json(dest / "run.json", {**read_json(source / "run.json"), **run_updates})
