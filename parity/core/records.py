"""The files a run leaves behind, written atomically and read back bit-exactly.

metrics.csv  step,loss,grad_norm,lr,tokens,step_time_s   one row per optimizer step (1-based); a run made
             by another training command has the columns it recorded (step, loss, grad_norm at least)
weights.csv  param,norm,sha256,sketch0..sketch3          one row per parameter (full tensor); the
             sketches are random projections of the logical tensor (parity.rank.digest.weight_sketches)
probes.csv   step,phase,name,stat,value                    logical probes (parity.rank.probes), in causal order:
             per probed step, forward modules in execution order, then gradients in backward
             order, then updates; absent for runs made without them (other trainers, older runs)
run.json     provenance of one setup's run ("weights_recorded": false where a command left no final weights)

Floats are written with `repr`, which round-trips every IEEE double exactly; they are parsed
with Python's `float` (correctly rounded), never through a lossy text-to-float path, and read
column by column into numpy arrays, since a long run has 10^5 rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path

import numpy as np

from parity.core import files
from parity.core.errors import InputError
from parity.core.paths import inside

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


def being_written(name: str) -> str | None:
    """The file name whose atomic write (atomic_open's temporary file) `name` is, or None."""
    found = _TEMPORARY.fullmatch(name)
    return found.group(1) if found else None


_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")  # tempfile.mkstemp's 8 random characters


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", permissions: int | None = None):
    """A file object whose contents appear at `path` whole, on success only: a temporary file in the
    same directory, renamed over `path`. Readers never see half a file. `permissions`: the file's mode
    bits, from its creation (default: what the umask allows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600, O_EXCL
    try:
        # mkstemp makes 0600; a team's shared report must stay readable
        os.fchmod(fd, 0o666 & ~current_umask() if permissions is None else permissions)
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
    header, columns = read_columns(path, required)
    return header, rows_of(columns)


def rows_of(columns: dict[str, np.ndarray]) -> list[dict]:
    """One dict per row, with Python ints, floats and strings (a double's bits unchanged)."""
    names = list(columns)
    return [dict(zip(names, row)) for row in zip(*(columns[c].tolist() for c in names))]


def read_columns(path: str | Path, required=()) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Returns (the `# key: value` header lines, each column whole): int64 for INT_COLUMNS, an object
    array of str for STR_COLUMNS, float64 for the rest.

    Every float goes through Python's `float`, which rounds correctly, so a `repr` comes back as
    the same double. `required` names the columns the caller reads: a file without one of them
    is a RecordError, as is any malformed line (the error names it).
    """
    path = Path(path)
    try:
        text = files.read_text(path)
    except OSError as e:
        raise RecordError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RecordError(f"{path}: not a text file (binary content); expected CSV") from None
    lines = text.splitlines()
    header: dict[str, str] = {}
    for lineno, line in enumerate(lines if "#" in text else (), 1):  # a file without "#" has no header lines
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if not sep:
                raise RecordError(f"{path}:{lineno}: header line is not '# key: value'")
            header[key.strip()] = value.strip()
    linenos = [n for n, line in enumerate(lines, 1) if not line.startswith("#")] if header else range(1, len(lines) + 1)
    data = [line for line in lines if not line.startswith("#")] if header else lines
    if not data:
        raise RecordError(f"{path}: no header row")
    try:
        columns = next(csv.reader([data[0]]), [])
    except csv.Error as e:
        raise RecordError(f"{path}:{linenos[0]}: not a CSV line ({e})") from None
    if missing := [c for c in required if c not in columns]:
        raise RecordError(f"{path}:{linenos[0]}: missing column(s) {', '.join(missing)}; "
                          f"the header has {','.join(columns)}")
    try:
        cells = _split_cells(text, data[1:], len(columns))
        return header, {name: _parse(name, col) for name, col in zip(columns, cells)}
    except (csv.Error, ValueError, OverflowError):
        raise _first_error(path, columns, data[1:], linenos[1:]) from None


def _split_cells(text: str, lines: list[str], width: int) -> list[list[str]]:
    """Each column's cells in line order; ValueError if a line has another number of fields."""
    if not lines:
        return [[] for _ in range(width)]
    if '"' in text or "" in lines:  # quoted cells, or an empty line (no fields): the csv module, line by line
        rows = [next(csv.reader([line]), []) for line in lines]
        if any(len(row) != width for row in rows):
            raise ValueError("a line with another number of fields")
        return [list(column) for column in zip(*rows)]
    # Without quotes a line's fields are its comma-separated parts, as the csv module finds them; one
    # split of all lines at once is several times faster than one split per line.
    if (np.fromiter(map(str.count, lines, repeat(",")), np.int64, len(lines)) != width - 1).any():
        raise ValueError("a line with another number of fields")
    flat = ",".join(lines).split(",")
    return [flat[j::width] for j in range(width)]


def _parse(name: str, cells) -> np.ndarray:
    """One column's cells as an array; ValueError (or OverflowError past int64) if one is not a number."""
    if name in STR_COLUMNS:
        return np.array(cells, dtype=object) if cells else np.empty(0, dtype=object)
    parse, dtype = (int, np.int64) if name in INT_COLUMNS else (float, np.float64)
    return np.fromiter(map(parse, cells), dtype, len(cells))


def _first_error(path: Path, columns: list[str], lines: list[str], linenos) -> RecordError:
    """The error of the first bad line, found line by line as a reader reading in order would (the whole-column
    read has failed somewhere; this names where)."""
    for lineno, line in zip(linenos, lines):
        try:
            cells = next(csv.reader([line]), [])
        except csv.Error as e:
            return RecordError(f"{path}:{lineno}: not a CSV line ({e})")
        if len(cells) != len(columns):
            return RecordError(f"{path}:{lineno}: {len(cells)} fields, expected {len(columns)} ({','.join(columns)})")
        for name, cell in zip(columns, cells):
            try:
                _parse(name, [cell])
            except ValueError:
                return RecordError(f"{path}:{lineno}: column {name!r}: {cell!r} is not a number")
            except OverflowError:
                return RecordError(f"{path}:{lineno}: column {name!r}: {cell!r} is out of range")
    raise AssertionError(f"{path}: the whole-column read failed, but no line is bad")


def write_metrics(path, rows) -> None:
    """The columns the rows have, in METRIC_COLUMNS order (a command may not record lr, tokens or times)."""
    write_csv(path, [c for c in METRIC_COLUMNS if rows and c in rows[0]] or METRIC_REQUIRED, rows)


def read_metrics(path) -> list[dict]:
    return read_csv(path, METRIC_REQUIRED)[1]


def read_metric_columns(path) -> dict[str, np.ndarray]:
    """metrics.csv as whole columns (what compare and reports work on: a long run has 10^5 rows)."""
    return read_columns(path, METRIC_REQUIRED)[1]


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
        value = json.loads(files.read_text(path))
    except OSError as e:
        raise RecordError(f"{path}: cannot read JSON: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(value, dict):
        raise RecordError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_setup_run(directory: str | Path, lenient: bool = False) -> dict:
    """The one reader of a setup's run records: {"info": run.json, "metrics": columns (read_metric_columns),
    "weights": rows,
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
            run["metrics"] = read_metric_columns(directory / "metrics.csv")
            if run["info"].get("weights_recorded", True):
                run["weights"] = read_weights(directory / "weights.csv")
            if (directory / "probes.csv").is_file():
                run["probes"] = read_probes(directory / "probes.csv")
    except RecordError:
        if not lenient:
            raise
        if run["metrics"] is None and (directory / "metrics.csv").is_file():
            try:  # a failed or unreadable run may still have written the steps it made
                run["metrics"] = read_metric_columns(directory / "metrics.csv")
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
