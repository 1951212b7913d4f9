"""Read back the per-step metrics a training command wrote, exactly, as parity's metric rows.

A `trainer = "command"` setup runs someone else's training script; its numbers reach parity only
through what it wrote. A case file says where, in a `metrics = {...}` table:

    { reader = "tensorboard", path = "tb", loss = "TAG", grad_norm = "TAG", lr = "TAG", tokens = "TAG" }
    { reader = "jsonl", path = "metrics.jsonl", step = "step", loss = "loss", ... }
    { reader = "regex", path = "log", pattern = '...(?P<step>\\d+)...(?P<loss>\\S+)...', exact = false }

Nothing is ever rounded here. TensorBoard stores binary float32 (or float64) values, converted
without a text round trip; JSON floats written by repr parse back to the same double. Text a
script printed with fewer digits cannot be exact: the regex reader then reports, per metric, the
largest half-unit of the last printed decimal place (`ReadMetrics.rounded`), so that a comparison
can allow for the printing and for nothing else.

Every reader merges what it saw into {step: {metric: value}}: a value seen twice (several ranks
printing the same line, a TensorBoard file per rank) is one value if the two agree, an error if
they do not. The steps must then be exactly 1..steps, loss and grad_norm present at every step,
lr and tokens at every step or at none.

What a command wrote is input, read in the host process: a file is opened only if it is a regular
file (parity.core.files: a FIFO would block the open forever), at most MAX_FILE_BYTES of it, a line at
a time; the regex reader's pattern runs on the `regex` engine (re's syntax) with a time budget per
line and per file, so a pattern that backtracks catastrophically fails its setup instead of hanging
parity.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import regex

from parity.core import files
from parity.core.files import NotRegular, open_regular
from parity.core.records import RecordError

READERS = ("tensorboard", "jsonl", "regex")
METRICS = ("loss", "grad_norm", "lr", "tokens")
REQUIRED = ("loss", "grad_norm")
COMPARED = REQUIRED
# Per-step columns of metrics.csv for values read from rounded text: half a unit of the last printed place.
ROUNDING = {m: f"{m}_rounding" for m in COMPARED}
INT_METRICS = ("tokens",)
# Where each reader looks when the table names no path; "log" is the command's captured stdout+stderr.
DEFAULT_PATH = {"tensorboard": "tb", "jsonl": "metrics.jsonl", "regex": "log"}
LOG = "log"
KEYS = {
    "tensorboard": ("reader", "path") + METRICS,  # metric -> tag
    "jsonl": ("reader", "path", "step") + METRICS,  # metric -> JSON key
    "regex": ("reader", "path", "pattern", "exact"),
}
TB_GLOB = "events.out.tfevents.*"
# A float32 holds every integer up to 2^24 exactly; above it a token count may have been rounded on writing.
FLOAT32_EXACT_INT = 2**24
# Colour and cursor escape sequences (CSI ... letter) that loggers put around numbers.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A printed decimal number: sign, digits, optional fraction, optional exponent.
DECIMAL = re.compile(r"[+-]?(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?")
# What one metrics file, log or event file may hold: 1 KB a step for a million steps fits; a runaway
# log of many GB fails with one line instead of filling the host's memory.
MAX_FILE_BYTES = files.MAX_BYTES
# A pattern that matches in linear time takes micro- to milliseconds on a log line; one that
# backtracks catastrophically takes years on a 40-digit number. A line may take this long, and the
# whole file the setup's timeout (read_metrics' budget_s).
LINE_BUDGET_S = 1.0
LINEAR_EXAMPLE = r"(?P<loss>\S+)"
NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


class MetricsReadError(RecordError):
    """What a training command wrote cannot be read as parity's metrics; one line naming the file and what is wrong."""


@dataclass(frozen=True)
class ReadMetrics:
    rows: list[dict]  # {"step", "loss", "grad_norm"[, "lr"][, "tokens"]}, steps 1..N in order
    rounded: dict[str, float] = field(default_factory=dict)  # metric -> largest half-unit of the last printed place
    source: str = ""  # one line for run.json: what was read, from where


# ---------------------------------------------------------------------------------------------
# Validation of the case file's table (no raising: the case loader words the error)


def reader_problems(table) -> list[tuple[str, str]]:
    """Everything wrong with a `metrics = {...}` table, as (key, one line) pairs; [] when it can be read."""
    out: list[tuple[str, str]] = []
    add = lambda key, message: out.append((f"metrics.{key}", message))
    if not isinstance(table, dict):
        return [("metrics", f"must be a table, got {table!r}")]
    reader = table.get("reader")
    if reader is None:
        add("reader", f"missing; allowed: {', '.join(READERS)}")
        return out
    if reader not in READERS:
        add("reader", f"{reader!r} is not allowed; allowed: {', '.join(READERS)}")
        return out
    allowed = KEYS[reader]
    for key in table:
        if key not in allowed:
            add(key, f"unknown key for reader \"{reader}\"; allowed: {', '.join(allowed)}")
    for key in allowed:
        if key in ("reader", "exact") or key not in table:
            continue
        if not isinstance(table[key], str) or not table[key]:
            add(key, f"{table[key]!r} is not a non-empty string")
    text = lambda key: table[key] if isinstance(table.get(key), str) else ""  # "" (not a string) was reported above
    if text("path") and (why := _path_problem(text("path"))):
        add("path", why)
    if reader == "regex":
        if "exact" in table and not isinstance(table["exact"], bool):
            add("exact", f"{table['exact']!r} is not a boolean; allowed: true, false")
        if "pattern" not in table:
            add("pattern", "missing; the regex reader needs a pattern with named groups step, loss, grad_norm")
        elif text("pattern") and (why := _pattern_problem(text("pattern"))):
            add("pattern", why)
    return out


def _path_problem(path: str) -> str | None:
    # A case file travels between machines: its paths must stay inside the command's output directory.
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or path.startswith("~"):
        return f"{path!r} is absolute; allowed: a path relative to the command's output directory"
    if ".." in re.split(r"[/\\]", path):
        return f"{path!r} leaves the command's output directory ('..'); allowed: a path inside it"
    if "\0" in path:
        return f"{path!r} holds a NUL character"
    return None


def compile_pattern(pattern: str) -> regex.Pattern:
    """The pattern as the regex engine runs it (its matches take a timeout); it must also be valid for
    Python's re, the syntax a case file is promised (regex alone would accept a group name twice)."""
    re.compile(pattern)
    return regex.compile(pattern)


def _pattern_problem(pattern: str) -> str | None:
    try:
        groups = set(compile_pattern(pattern).groupindex)
    except (re.error, regex.error) as e:
        return f"does not compile: {e}"
    missing = [g for g in ("step",) + REQUIRED if g not in groups]
    if missing:
        return (f"has no named group(s) {', '.join(missing)}; allowed: a regex with (?P<step>...), (?P<loss>...), "
                "(?P<grad_norm>...) and optionally (?P<lr>...), (?P<tokens>...)")
    if extra := sorted(groups - {"step", *METRICS}):
        return f"has named group(s) {', '.join(extra)} that name no metric; allowed: step, {', '.join(METRICS)}"
    return None


# ---------------------------------------------------------------------------------------------
# Reading


def read_metrics(table: dict, output_dir: Path, log_path: Path, steps: int, budget_s: float = math.inf) -> ReadMetrics:
    """The command's metrics for steps 1..steps, exactly as it wrote them; MetricsReadError if they cannot be.

    `budget_s`: how long the regex reader's pattern may run over the whole file (a run passes its
    setup's timeout); each line has LINE_BUDGET_S whatever it is.
    """
    if problems := reader_problems(table):
        key, message = problems[0]
        raise MetricsReadError(f"{key}: {message}")
    reader = table["reader"]
    rel = table.get("path", DEFAULT_PATH[reader])
    path = Path(log_path) if reader == "regex" and rel == LOG else Path(output_dir) / rel
    seen = _Seen()
    rounded: dict[str, float] = {}
    if reader == "tensorboard":
        tags = {m: table.get(m, m) for m in METRICS if m in REQUIRED or m in table}
        files = _read_tensorboard(path, tags, seen)
        where = f"{path} ({len(files)} event file{'s' * (len(files) != 1)})"
        what = "tags " + ", ".join(f"{m}={t!r}" for m, t in tags.items())
        nothing = f"no scalar with the tags {', '.join(repr(t) for t in tags.values())}"
    elif reader == "jsonl":
        keys = {m: table.get(m, m) for m in ("step",) + METRICS}
        _read_jsonl(path, keys, seen)
        where, what = str(path), "keys " + ", ".join(f"{m}={k!r}" for m, k in keys.items())
        nothing = f"no line with the step key {keys['step']!r} and a metric key"
    else:
        exact = table.get("exact", False)
        rounded = _read_regex(path, compile_pattern(table["pattern"]), exact, seen, budget_s)
        where = str(path)
        what = f"pattern {table['pattern']!r}, " + ("exact (every value round-trips)" if exact else "values rounded as printed")
        nothing = "no line matched the pattern"
    rows = seen.rows(path, steps, nothing)
    present = [m for m in METRICS if m in rows[0]]
    for m in COMPARED:  # each step's own rounding, so one short value cannot widen every step's allowance
        if m in rounded:
            for r in rows:
                r[ROUNDING[m]] = rounded[m].get(r["step"], 0.0)
    return ReadMetrics(rows=rows, rounded={m: max(rounded[m].values()) for m in present if m in rounded},
                       source=f"{reader}: {where}; {what}; read {', '.join(present)} for steps 1..{steps}")


class _Seen:
    """{step: {metric: (value, where)}}, merging repeats and refusing contradictions."""

    def __init__(self):
        self.values: dict[int, dict[str, tuple[float | int, str]]] = {}

    def add(self, step: int, metric: str, value, where: str) -> None:
        prior = self.values.setdefault(step, {}).get(metric)
        if prior is None:
            self.values[step][metric] = (value, where)
        elif not _same(prior[0], value):
            raise MetricsReadError(f"{where}: step {step} {metric} is {value!r}, but {prior[1]} gave {prior[0]!r} "
                                   "for the same step; allowed: a step's values repeated identically or not at all")

    def rows(self, path: Path, steps: int, nothing: str) -> list[dict]:
        found = sorted(self.values)
        if not found:
            raise MetricsReadError(f"{path}: no metrics found for any step ({nothing})")
        expected = set(range(1, steps + 1))
        if found == list(range(steps)):  # nanoGPT-style iteration counters start at 0
            raise MetricsReadError(f"{path}: steps 0..{steps - 1} found; expected 1..{steps} (parity counts "
                                   "optimizer steps from 1: log step + 1)")
        if extra := [s for s in found if s not in expected]:
            raise MetricsReadError(f"{path}: step(s) {_spans(extra)} found; expected exactly 1..{steps}")
        if missing := sorted(expected - set(found)):
            raise MetricsReadError(f"{path}: step(s) {_spans(missing)} missing; expected exactly 1..{steps}")
        rows = []
        for step in range(1, steps + 1):
            got = self.values[step]
            for m in REQUIRED:
                if m not in got:
                    raise MetricsReadError(f"{path}: step {step} has no {m}")
            rows.append({"step": step, **{m: got[m][0] for m in METRICS if m in got}})
        for m in METRICS:  # an optional metric at some steps only would leave holes in metrics.csv
            have = [r["step"] for r in rows if m in r]
            if have and len(have) != len(rows):
                lacking = [r["step"] for r in rows if m not in r]
                raise MetricsReadError(f"{path}: {m} is present at step(s) {_spans(have)} but not at "
                                       f"{_spans(lacking)}; allowed: at every step or at none")
        return rows


def _same(a, b) -> bool:
    """Bitwise equality: NaN is the same as NaN (a diverged run printed twice), 0.0 is not -0.0."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return type(a) is type(b) and a == b


def _spans(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (a missing stretch of 10000 steps stays one short line)."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out[:10]) + (f", ... ({len(out) - 10} more)" if len(out) > 10 else "")


def _open(path: Path):
    """A regular file of at most MAX_FILE_BYTES opened for reading, never blocking; else MetricsReadError."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise MetricsReadError(f"{path}: no such file; the command was expected to write its metrics there") from None
    except NotRegular as e:
        raise MetricsReadError(f"{e}; allowed: a regular file written by the command") from None
    except OSError as e:
        raise MetricsReadError(f"{path}: cannot read: {e.strerror or e}") from None
    if (size := os.fstat(f.fileno()).st_size) > MAX_FILE_BYTES:
        f.close()
        raise MetricsReadError(_too_big(path, size))
    return f


def _too_big(path: Path, size: int) -> str:
    return (f"{path}: {size:,} bytes or more; allowed: at most {MAX_FILE_BYTES:,} bytes "
            "(log less, or point the reader at a smaller file)")


def _lines(path: Path):
    """("PATH:LINE", text) for each line of a text file, read a line at a time: memory holds one line, never the file."""
    with _open(path) as f:
        lineno = done = 0
        try:
            while raw := f.readline(MAX_FILE_BYTES + 1 - done):  # a file still growing stops at the cap too
                done += len(raw)
                if done > MAX_FILE_BYTES:
                    raise MetricsReadError(_too_big(path, done))
                # str.splitlines also splits at \r: the same lines, and line numbers, as splitting the whole text
                for line in raw.decode("utf-8", "replace").splitlines():
                    lineno += 1
                    yield f"{path}:{lineno}", line
        except OSError as e:
            raise MetricsReadError(f"{path}: cannot read: {e.strerror or e}") from None


def _int(value, where: str, what: str) -> int:
    """An integer from JSON or TensorBoard: an int, or a float with an integral value (never rounded)."""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise MetricsReadError(f"{where}: {what} {value!r} is not an integer")
    return int(value)


# --- TensorBoard -----------------------------------------------------------------------------


def _read_tensorboard(path: Path, tags: dict[str, str], seen: _Seen) -> list[Path]:
    try:
        from tensorboard.backend.event_processing.event_file_loader import (
            EventFileLoader,
        )
        from tensorboard.util import tensor_util
    except ImportError:
        raise MetricsReadError(f"{path}: reading TensorBoard event files needs the tensorboard package; "
                               "pip install tensorboard (or pip install \"parity[torchtitan]\")") from None
    files = _event_files(path)
    if not files:
        raise MetricsReadError(f"{path}: no TensorBoard event files ({TB_GLOB}) found there or below; "
                               "the command was expected to write its scalars there")
    by_tag = {tag: m for m, tag in tags.items()}
    for f in files:
        with _open(f) as handle:
            # The loader opens a path: /proc/self/fd/N is the very file checked above, so a FIFO swapped in
            # since cannot be what it opens (elsewhere than Linux, the name itself).
            by_fd = f"/proc/self/fd/{handle.fileno()}"
            for event in _events(EventFileLoader(by_fd if os.path.exists(by_fd) else str(f)).Load(), f):
                for v in event.summary.value:
                    metric = by_tag.get(v.tag)
                    if metric is None:
                        continue
                    where = f"{f}: tag {v.tag!r} step {event.step}"
                    seen.add(int(event.step), metric, _tb_scalar(v, tensor_util, where, metric), where)
    return files


def _event_files(path: Path) -> list[Path]:
    """A folder is searched recursively (torchtitan writes tb/<timestamp>/, some scripts a folder per rank).
    Whatever bears an event file's name and is not a folder is listed, to be refused if it is no regular file."""
    if path.is_dir():
        return sorted(p for p in path.rglob(TB_GLOB) if not p.is_dir())
    return [path] if os.path.lexists(path) else []


def _events(loaded, f: Path):
    """The loader's events one at a time (never the whole file in memory); its failure as one line naming the file."""
    while True:
        try:
            event = next(loaded)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a damaged record raises whatever protobuf or the record layer raises
            raise MetricsReadError(f"{f}: not a readable TensorBoard event file ({type(e).__name__}: {e})") from None
        yield event


def _tb_scalar(v, tensor_util, where: str, metric: str):
    # EventFileLoader turns legacy simple_value summaries into float32 tensors; both are binary.
    if v.HasField("tensor"):
        array = tensor_util.make_ndarray(v.tensor)
    elif v.HasField("simple_value"):
        import numpy as np

        array = np.float32(v.simple_value)
    else:
        raise MetricsReadError(f"{where}: not a scalar summary")
    if array.size != 1 or array.dtype.kind not in "fiu":
        raise MetricsReadError(f"{where}: {array.dtype} of shape {tuple(array.shape)} is not a numeric scalar")
    value = array.reshape(()).item()  # numpy float32/float64 -> the same number as a Python float, exactly
    if metric not in INT_METRICS:
        return float(value)
    if array.dtype.itemsize <= 4 and array.dtype.kind == "f" and abs(value) > FLOAT32_EXACT_INT:
        raise MetricsReadError(f"{where}: token count {value!r} stored as float32, which holds integers exactly only "
                               f"up to 2^24; drop the tokens tag or log it with double_precision")
    return _int(value, where, metric)


# --- JSON lines ------------------------------------------------------------------------------


def _read_jsonl(path: Path, keys: dict[str, str], seen: _Seen) -> None:
    for where, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)  # NaN / Infinity literals parse to float('nan') / inf
        except (ValueError, RecursionError) as e:  # RecursionError: '[' nested deeper than the parser goes
            raise MetricsReadError(f"{where}: not a JSON line ({e})") from None
        if not isinstance(obj, dict):
            raise MetricsReadError(f"{where}: a JSON {type(obj).__name__}, expected one object per line")
        if keys["step"] not in obj:
            continue  # other things the script logs (config, eval) carry no step
        step = _int(obj[keys["step"]], where, f"step key {keys['step']!r}")
        for m in METRICS:
            if keys[m] in obj:
                seen.add(step, m, _json_value(obj[keys[m]], where, m, keys[m]), where)


def _json_value(value, where: str, metric: str, key: str):
    if metric in INT_METRICS:
        return _int(value, where, f"{metric} (key {key!r})")
    if isinstance(value, str) and value.strip().lower() in NON_FINITE:
        return float(value)  # a diverged run: strict JSON writers spell NaN as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetricsReadError(f"{where}: {metric} (key {key!r}) is {value!r}, not a number")
    return float(value)  # an int loss is exact as a float; a float is already the written double


# --- regex over text -------------------------------------------------------------------------


def _read_regex(path: Path, pattern: regex.Pattern, exact: bool, seen: _Seen,
                budget_s: float) -> dict[str, dict[int, float]]:
    """Fills `seen`; returns {metric: {step: half-unit of the last printed place}} ({} when exact)."""
    rounded: dict[str, dict[int, float]] = {}
    deadline = time.monotonic() + budget_s
    for where, line in _lines(path):
        match = _search(pattern, ANSI.sub("", line), where, deadline, budget_s)
        if match is None:
            continue
        step = _text_int(match.group("step"), where, "step")
        for m in METRICS:
            text = match.groupdict().get(m)
            if text is None:  # the group is optional in the pattern, or absent from it
                continue
            if m in INT_METRICS:
                seen.add(step, m, _text_int(text, where, m), where)
                continue
            try:
                if "_" in text:  # float() accepts '1_000.5'; no logger prints it, a too-greedy group might match it
                    raise ValueError
                value = float(text)
            except ValueError:
                raise MetricsReadError(f"{where}: {m} {text!r} is not a number") from None
            if exact:
                if not _round_trips(text, value):
                    raise MetricsReadError(
                        f"{where}: {m} {text!r} does not carry every bit (repr gives {value!r}); the script must "
                        "print repr(value) (Python's default str of a float), or set exact = false")
            elif (half := _half_unit(text)) is not None:
                steps = rounded.setdefault(m, {})
                steps[step] = max(steps.get(step, 0.0), half)
            seen.add(step, m, value, where)
    return {} if exact else rounded


def _search(pattern: regex.Pattern, line: str, where: str, deadline: float, budget_s: float):
    """pattern.search(line) within LINE_BUDGET_S and what is left of the file's budget; MetricsReadError past it."""
    limit = min(LINE_BUDGET_S, deadline - time.monotonic())
    try:
        if limit <= 0:
            raise TimeoutError
        return pattern.search(line, timeout=limit)
    except TimeoutError:
        took = (f"more than {LINE_BUDGET_S:g} s on one line" if limit == LINE_BUDGET_S
                else f"more than the {budget_s:g} s the whole file may take (the setup's timeout), by this line")
        raise MetricsReadError(f"{where}: the regex reader's pattern {pattern.pattern!r} took {took} (catastrophic "
                               f"backtracking?); allowed: a pattern that matches in linear time, e.g. "
                               f"{LINEAR_EXAMPLE}") from None


def _text_int(text: str, where: str, what: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text.strip()):
        raise MetricsReadError(f"{where}: {what} {text!r} is not an integer")
    return int(text)


def _round_trips(text: str, value: float) -> bool:
    if not math.isfinite(value):
        return text.strip().lower() in NON_FINITE
    return repr(value) == text


def _half_unit(text: str) -> float | None:
    """Half a unit of the last printed decimal place: '8.10213' -> 5e-06, '1.5e-05' -> 5e-07, '7' -> 0.5.

    None for nan/inf, which carry no digits to round. Built as the literal '5e<k>' so that the
    half-unit is the double nearest 5*10^k, not a product with its own rounding.
    """
    match = DECIMAL.fullmatch(text.strip())
    if match is None or not (match.group(1) or match.group(2)):
        return None
    last_place = int(match.group(3) or 0) - len(match.group(2) or "")
    return float(f"5e{last_place - 1}")
