"""parity.trainers.readers: a training command's metrics read back exactly, or one clear error line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from parity.trainers.readers import MetricsReadError, read_metrics, reader_problems
from parity.core.records import RecordError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "train_small.py"
LOG_PATTERN = r"step (?P<step>\d+) loss (?P<loss>\S+) grad_norm (?P<grad_norm>\S+)"
# The TensorBoard reader comes with the torchtitan extra (README's test command installs it).
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason='tensorboard not installed: pip install "parity[torchtitan]"')


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def write_jsonl(directory: Path, lines: list) -> None:
    (directory / "metrics.jsonl").write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def regex(tmp_path: Path, text: str, steps: int, **table):
    log = tmp_path / "cmd.log"
    log.write_text(text)
    return read_metrics({"reader": "regex", "pattern": LOG_PATTERN, **table}, tmp_path, log, steps)


# --- TensorBoard -----------------------------------------------------------------------------


@needs_tensorboard
def test_tensorboard_float32_values_arrive_bit_exact(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # float32 values with long decimal expansions: any text round trip at fewer digits would change them
    losses = [float(np.float32(x)) for x in (8.074956893920898, 7.93810510635376, float("nan"))]
    norms = [float(np.float32(x)) for x in (0.36990073323249817, 1e-7 / 3, 0.5694341659545898)]
    with SummaryWriter(log_dir=str(tmp_path / "tb" / "run1")) as w:  # a subfolder: files are found recursively
        for step, (loss, norm) in enumerate(zip(losses, norms), 1):
            w.add_scalar("train/loss", loss, step)
            w.add_scalar("grad_norm", norm, step)
            w.add_scalar("lr", 0.0025, step, new_style=True, double_precision=True)  # a float64 tensor
            w.add_scalar("tokens", 2048, step)
            w.add_scalar("other", 1.0, step)
    got = read_metrics({"reader": "tensorboard", "path": "tb", "loss": "train/loss", "lr": "lr", "tokens": "tokens"},
                       tmp_path, tmp_path / "log", 3)
    assert [r["step"] for r in got.rows] == [1, 2, 3]
    assert [bits(r["loss"]) for r in got.rows[:2]] == [bits(x) for x in losses[:2]]
    assert math.isnan(got.rows[2]["loss"])  # a diverged step is kept, for the comparison to fail
    assert [bits(r["grad_norm"]) for r in got.rows] == [bits(x) for x in norms]
    assert [r["lr"] for r in got.rows] == [0.0025] * 3  # the double itself, not float32(0.0025)
    assert [r["tokens"] for r in got.rows] == [2048] * 3 and isinstance(got.rows[0]["tokens"], int)
    assert got.rounded == {}
    assert "train/loss" in got.source and "tensorboard" in got.source


@needs_tensorboard
def test_tensorboard_lr_written_as_float32_reads_as_that_float32(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as w:
        w.add_scalar("loss", 2.0, 1)
        w.add_scalar("grad_norm", 1.0, 1)
        w.add_scalar("lr", 0.0025, 1)  # the default: stored as a float32 simple_value
    got = read_metrics({"reader": "tensorboard", "lr": "lr"}, tmp_path, tmp_path / "log", 1)
    assert bits(got.rows[0]["lr"]) == bits(float(np.float32(0.0025))) != bits(0.0025)


@needs_tensorboard
def test_tensorboard_ranks_writing_the_same_values_merge_and_different_values_fail(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for rank, loss2 in ((0, 3.0), (1, 3.0)):
        with SummaryWriter(log_dir=str(tmp_path / "tb" / f"rank{rank}")) as w:
            for step, loss in ((1, 2.0), (2, loss2)):
                w.add_scalar("loss", loss, step)
                w.add_scalar("grad_norm", 0.5, step)
    assert len(read_metrics({"reader": "tensorboard"}, tmp_path, tmp_path / "log", 2).rows) == 2
    with SummaryWriter(log_dir=str(tmp_path / "tb" / "rank2")) as w:
        w.add_scalar("loss", 3.5, 2)
    with pytest.raises(MetricsReadError, match=r"rank2.*step 2 loss is 3\.5, but .*rank\d.* gave 3\.0"):
        read_metrics({"reader": "tensorboard"}, tmp_path, tmp_path / "log", 2)


@needs_tensorboard
def test_tensorboard_without_event_files_names_the_folder(tmp_path):
    (tmp_path / "tb").mkdir()
    with pytest.raises(MetricsReadError, match=r"tb: no TensorBoard event files \(events\.out\.tfevents\.\*\)"):
        read_metrics({"reader": "tensorboard", "path": "tb"}, tmp_path, tmp_path / "log", 1)


@needs_tensorboard
def test_tensorboard_not_installed_says_how_to_install(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "tensorboard" or n.startswith("tensorboard.")] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    with pytest.raises(MetricsReadError, match=r"pip install tensorboard .*parity\[torchtitan\]"):
        read_metrics({"reader": "tensorboard"}, tmp_path, tmp_path / "log", 1)


# --- JSON lines ------------------------------------------------------------------------------


def test_jsonl_reads_repr_floats_exactly_and_keeps_nan(tmp_path):
    loss1 = 8.074956893920898
    write_jsonl(tmp_path, [
        {"config": "anything"},  # no step key: skipped
        {"step": 1, "loss": loss1, "grad_norm": 0.1 + 0.2, "lr": 0.0025, "tokens": 2048},
        '{"step": 2, "loss": NaN, "grad_norm": Infinity, "lr": 0.005, "tokens": 2048}',
        {"step": 3, "loss": "nan", "grad_norm": "Infinity", "lr": 0.005, "tokens": 2048.0},
        "",
        {"step": 3, "eval_loss": 1.0},  # a step's other log line adds nothing and conflicts with nothing
    ])
    got = read_metrics({"reader": "jsonl"}, tmp_path, tmp_path / "log", 3)
    assert bits(got.rows[0]["loss"]) == bits(loss1) and bits(got.rows[0]["grad_norm"]) == bits(0.1 + 0.2)
    assert math.isnan(got.rows[1]["loss"]) and got.rows[1]["grad_norm"] == math.inf
    assert math.isnan(got.rows[2]["loss"]) and got.rows[2]["grad_norm"] == math.inf
    assert [r["tokens"] for r in got.rows] == [2048] * 3
    assert got.rounded == {}


def test_jsonl_custom_keys_and_optional_metrics_absent(tmp_path):
    write_jsonl(tmp_path, [{"iter": i, "train_loss": 1.5, "gnorm": 0.25} for i in (1, 2)])
    got = read_metrics({"reader": "jsonl", "step": "iter", "loss": "train_loss", "grad_norm": "gnorm"},
                       tmp_path, tmp_path / "log", 2)
    assert got.rows == [{"step": 1, "loss": 1.5, "grad_norm": 0.25}, {"step": 2, "loss": 1.5, "grad_norm": 0.25}]


@pytest.mark.parametrize("line, message", [
    ('{"step": 1, "loss": 1.0, "grad_norm": ', r"metrics\.jsonl:1: not a JSON line"),
    ('{"step": 1, "loss": "7.5", "grad_norm": 1.0}', r"metrics\.jsonl:1: loss \(key 'loss'\) is '7\.5', not a number"),
    ('{"step": 1.5, "loss": 1.0, "grad_norm": 1.0}', r"metrics\.jsonl:1: step key 'step' 1\.5 is not an integer"),
    ('[1, 2]', r"metrics\.jsonl:1: a JSON list, expected one object per line"),
])
def test_jsonl_bad_lines_name_the_line(tmp_path, line, message):
    write_jsonl(tmp_path, [line])
    with pytest.raises(MetricsReadError, match=message):
        read_metrics({"reader": "jsonl"}, tmp_path, tmp_path / "log", 1)


def test_jsonl_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(MetricsReadError, match=rf"{tmp_path}/out/metrics\.jsonl: no such file"):
        read_metrics({"reader": "jsonl"}, tmp_path / "out", tmp_path / "log", 1)


# --- regex over text -------------------------------------------------------------------------


def test_regex_rounded_values_report_the_half_unit_of_the_printed_place(tmp_path):
    got = regex(tmp_path, "warming up\n"
                          "\x1b[32mstep 1 loss 8.10213 grad_norm 1.5e-05\x1b[0m\n"  # colour codes around the numbers
                          "step 2 loss 7.9 grad_norm 2.25E-05\n"
                          "step 3 loss nan grad_norm 3e-05\n", 3)
    assert [r["loss"] for r in got.rows[:2]] == [8.10213, 7.9] and math.isnan(got.rows[2]["loss"])
    assert [r["grad_norm"] for r in got.rows] == [1.5e-05, 2.25e-05, 3e-05]
    # each step keeps its own printing's half-unit ('nan' carries no digits); the summary is the loosest
    assert [r["loss_rounding"] for r in got.rows] == [5e-06, 0.05, 0.0]
    assert [r["grad_norm_rounding"] for r in got.rows] == [5e-07, 5e-08, 5e-06]
    assert got.rounded == {"loss": 0.05, "grad_norm": 5e-06}
    assert "lr" not in got.rows[0] and "tokens" not in got.rows[0]


def test_regex_reads_log_path_only_for_log_and_a_file_under_output_dir_otherwise(tmp_path):
    (tmp_path / "train.txt").write_text("step 1 loss 2.5 grad_norm 0.5\n")
    got = read_metrics({"reader": "regex", "path": "train.txt", "pattern": LOG_PATTERN}, tmp_path,
                       tmp_path / "no-such.log", 1)
    assert got.rows == [{"step": 1, "loss": 2.5, "grad_norm": 0.5, "loss_rounding": 0.05, "grad_norm_rounding": 0.05}]
    assert got.rounded == {"loss": 0.05, "grad_norm": 0.05}
    with pytest.raises(MetricsReadError, match=r"no-such\.log: no such file"):
        read_metrics({"reader": "regex", "pattern": LOG_PATTERN}, tmp_path, tmp_path / "no-such.log", 1)


def test_regex_exact_accepts_repr_text(tmp_path):
    loss, norm = 8.074956893920898, 0.36990073323249817
    got = regex(tmp_path, f"step 1 loss {loss!r} grad_norm {norm!r}\nstep 2 loss nan grad_norm inf\n", 2, exact=True)
    assert bits(got.rows[0]["loss"]) == bits(loss) and bits(got.rows[0]["grad_norm"]) == bits(norm)
    assert math.isnan(got.rows[1]["loss"]) and got.rows[1]["grad_norm"] == math.inf
    assert got.rounded == {}


@pytest.mark.parametrize("printed", ["8.074957E+00", "8.0750", "1.50e-05"])
def test_regex_exact_refuses_text_that_is_not_repr(tmp_path, printed):
    with pytest.raises(MetricsReadError, match=rf"cmd\.log:2: loss '{re.escape(printed)}' does not carry every bit "
                                               r".*print repr\(value\).*or set exact = false"):
        regex(tmp_path, f"step 1 loss 1.25 grad_norm 0.5\nstep 2 loss {printed} grad_norm 0.5\n", 2, exact=True)


def test_regex_optional_lr_and_tokens_groups(tmp_path):
    pattern = LOG_PATTERN + r"(?: lr (?P<lr>\S+))?(?: tokens (?P<tokens>\d+))?"
    log = tmp_path / "cmd.log"
    log.write_text("step 1 loss 2.0 grad_norm 1.0 lr 0.0025 tokens 2048\nstep 2 loss 1.0 grad_norm 1.0 lr 0.005 tokens 2048\n")
    got = read_metrics({"reader": "regex", "pattern": pattern, "exact": True}, tmp_path, log, 2)
    assert [(r["lr"], r["tokens"]) for r in got.rows] == [(0.0025, 2048), (0.005, 2048)]
    log.write_text("step 1 loss 2.0 grad_norm 1.0 lr 0.0025\nstep 2 loss 1.0 grad_norm 1.0\n")
    with pytest.raises(MetricsReadError, match=r"lr is present at step\(s\) 1 but not at 2; allowed: at every step or at none"):
        read_metrics({"reader": "regex", "pattern": pattern}, tmp_path, log, 2)


# --- rules shared by every reader --------------------------------------------------------------


def test_a_step_printed_twice_identically_is_one_step(tmp_path):
    line = "step 1 loss 2.0 grad_norm 1.0\n"
    got = regex(tmp_path, line + line + "step 2 loss 1.5 grad_norm 0.5\n" + line, 2)  # two ranks print the same line
    assert [r["step"] for r in got.rows] == [1, 2]


def test_a_step_printed_twice_differently_fails_naming_both_lines(tmp_path):
    with pytest.raises(MetricsReadError, match=r"cmd\.log:3: step 1 loss is 2\.5, but .*cmd\.log:1 gave 2\.0"):
        regex(tmp_path, "step 1 loss 2.0 grad_norm 1.0\nstep 2 loss 1.5 grad_norm 0.5\nstep 1 loss 2.5 grad_norm 1.0\n", 2)


def test_nan_repeated_is_the_same_value_but_zero_and_minus_zero_are_not(tmp_path):
    write_jsonl(tmp_path, [{"step": 1, "loss": "nan", "grad_norm": 0.0}, '{"step": 1, "loss": NaN, "grad_norm": 0.0}'])
    assert math.isnan(read_metrics({"reader": "jsonl"}, tmp_path, tmp_path / "log", 1).rows[0]["loss"])
    write_jsonl(tmp_path, [{"step": 1, "loss": 1.0, "grad_norm": 0.0}, {"step": 1, "loss": 1.0, "grad_norm": -0.0}])
    with pytest.raises(MetricsReadError, match=r"step 1 grad_norm is -0\.0, but .* gave 0\.0"):
        read_metrics({"reader": "jsonl"}, tmp_path, tmp_path / "log", 1)


def test_missing_step_is_named(tmp_path):
    with pytest.raises(MetricsReadError, match=r"cmd\.log: step\(s\) 2-3 missing; expected exactly 1\.\.4"):
        regex(tmp_path, "step 1 loss 2.0 grad_norm 1.0\nstep 4 loss 2.0 grad_norm 1.0\n", 4)


def test_extra_step_is_named(tmp_path):
    with pytest.raises(MetricsReadError, match=r"cmd\.log: step\(s\) 3 found; expected exactly 1\.\.2"):
        regex(tmp_path, "".join(f"step {s} loss 2.0 grad_norm 1.0\n" for s in (1, 2, 3)), 2)


def test_steps_counted_from_zero_get_a_hint(tmp_path):
    with pytest.raises(MetricsReadError, match=r"steps 0\.\.1 found; expected 1\.\.2 .*log step \+ 1"):
        regex(tmp_path, "step 0 loss 2.0 grad_norm 1.0\nstep 1 loss 2.0 grad_norm 1.0\n", 2)


def test_a_step_without_grad_norm_fails(tmp_path):
    write_jsonl(tmp_path, [{"step": 1, "loss": 1.0, "grad_norm": 1.0}, {"step": 2, "loss": 1.0}])
    with pytest.raises(MetricsReadError, match=r"metrics\.jsonl: step 2 has no grad_norm"):
        read_metrics({"reader": "jsonl"}, tmp_path, tmp_path / "log", 2)


def test_nothing_matched_is_an_error_not_an_empty_run(tmp_path):
    with pytest.raises(MetricsReadError, match=r"cmd\.log: no metrics found for any step \(no line matched the pattern\)"):
        regex(tmp_path, "iteration 1 | lm loss: 7.6\n", 1)


# --- what a command wrote is hostile: every read ends, and in bounded memory -------------------

# `(\d|\d)+` tries 2^n ways to split n digits before the missing 'x' fails it: on the 26-digit number
# below, seconds unbounded (a 40-digit one: years); re backtracks on `(\d+\.?)+` the same way.
BACKTRACKING = r"step (?P<step>\d+) loss (?P<loss>(\d|\d)+)x grad_norm (?P<grad_norm>\S+)"
LONG_NUMBER_LINE = "step 1 loss " + "1" * 26 + "\n"


def test_a_backtracking_pattern_fails_on_its_line_instead_of_hanging(tmp_path, monkeypatch):
    import parity.trainers.readers as readers

    monkeypatch.setattr(readers, "LINE_BUDGET_S", 0.2)
    log = tmp_path / "cmd.log"
    log.write_text("starting\nstep 1 loss 2.0x grad_norm 1.0\n" + LONG_NUMBER_LINE)
    start = time.monotonic()
    with pytest.raises(MetricsReadError) as e:
        read_metrics({"reader": "regex", "pattern": BACKTRACKING}, tmp_path, log, 1)
    assert time.monotonic() - start < 3
    assert str(e.value) == (f"{log}:3: the regex reader's pattern {BACKTRACKING!r} took more than 0.2 s on one line "
                            "(catastrophic backtracking?); allowed: a pattern that matches in linear time, "
                            "e.g. (?P<loss>\\S+)")


def test_the_whole_file_has_the_setups_timeout(tmp_path, monkeypatch):
    import parity.trainers.readers as readers

    monkeypatch.setattr(readers, "LINE_BUDGET_S", 60.0)  # each line alone could take a minute: the file may not
    log = tmp_path / "cmd.log"
    log.write_text("step 1 loss 2.0x grad_norm 1.0\n" + LONG_NUMBER_LINE * 3)
    start = time.monotonic()
    with pytest.raises(MetricsReadError, match=r"cmd\.log:2: the regex reader's pattern .* took more than the 0\.3 s "
                                               r"the whole file may take \(the setup's timeout\), by this line"):
        read_metrics({"reader": "regex", "pattern": BACKTRACKING}, tmp_path, log, 1, budget_s=0.3)
    assert time.monotonic() - start < 3


def test_the_pattern_is_checked_by_the_engine_that_runs_it_and_by_res_syntax():
    # regex alone takes a group name twice (and would keep one of the two values); re refuses it
    twice = {"reader": "regex", "pattern": LOG_PATTERN + r" again (?P<loss>\S+)"}
    assert reader_problems(twice)[0][0] == "metrics.pattern" and "does not compile" in reader_problems(twice)[0][1]
    assert reader_problems({"reader": "regex", "pattern": BACKTRACKING}) == []  # slow is found only on reading


@pytest.fixture
def fifo(tmp_path):
    """A FIFO no one writes to: open() for reading would wait for a writer forever."""

    def make(rel: str) -> Path:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    return make


def raised_without_blocking(fifo: Path, fn, *args) -> Exception | None:
    """What fn(*args) raised; the test fails (instead of hanging) if it blocks on the FIFO."""
    import threading

    got: list = []

    def call():
        try:
            fn(*args)
            got.append(None)
        except Exception as e:  # noqa: BLE001 - the caller looks at what it was
            got.append(e)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # blocked in open(): a writer comes and goes, which releases it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return got[0]


@pytest.mark.parametrize("table, rel", [
    ({"reader": "jsonl"}, "metrics.jsonl"),
    ({"reader": "regex", "path": "train.txt", "pattern": LOG_PATTERN}, "train.txt"),
    pytest.param({"reader": "tensorboard"}, "tb/run1/events.out.tfevents.1.host", marks=needs_tensorboard),
])
def test_every_reader_refuses_a_fifo_without_opening_it(tmp_path, fifo, table, rel):
    path = fifo(rel)
    error = raised_without_blocking(path, read_metrics, table, tmp_path, tmp_path / "log", 1)
    assert isinstance(error, MetricsReadError)
    assert str(error) == f"{path} is a FIFO, not a regular file; allowed: a regular file written by the command"


def test_a_device_is_refused_too(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/zero")  # endless: read whole, it would fill memory
    with pytest.raises(MetricsReadError, match=r"metrics\.jsonl is a character device, not a regular file"):
        read_metrics({"reader": "jsonl"}, tmp_path, tmp_path / "log", 1)


def test_a_fifo_swapped_in_after_the_check_neither_blocks_nor_is_read(tmp_path, fifo, monkeypatch):
    """The race the check alone leaves open: the open itself must not wait for a writer."""
    from parity.core import files

    path = fifo("metrics.jsonl")
    regular = os.stat(REPO / "README.md")
    monkeypatch.setattr(files.os, "stat", lambda p, **kw: regular if Path(p) == path else os.lstat(p))
    error = raised_without_blocking(path, files.open_regular, path)
    assert isinstance(error, files.NotRegular) and str(error) == f"{path} is a FIFO, not a regular file"


@pytest.mark.parametrize("table, rel", [({"reader": "jsonl"}, "metrics.jsonl"),
                                        ({"reader": "regex", "path": "log.txt", "pattern": LOG_PATTERN}, "log.txt")])
def test_a_file_of_several_gigabytes_fails_with_one_line(tmp_path, table, rel):
    with open(tmp_path / rel, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB long, no disk used
    with pytest.raises(MetricsReadError, match=rf"{re.escape(rel)}: 3,221,225,472 bytes or more; allowed: at most "
                                               r"1,073,741,824 bytes"):
        read_metrics(table, tmp_path, tmp_path / "log", 1)


def test_lines_are_numbered_as_before_across_cr_and_crlf(tmp_path):
    # read a line at a time now; \r and \r\n still end a line, as str.splitlines of the whole text did
    with pytest.raises(MetricsReadError, match=r"cmd\.log:4: step 1 loss is 3\.0, but .*cmd\.log:2 gave 2\.0"):
        regex(tmp_path, "a\r\nstep 1 loss 2.0 grad_norm 1.0\rb\nstep 1 loss 3.0 grad_norm 1.0\n", 1)


def test_json_nested_past_the_parsers_depth_is_one_line(tmp_path):
    write_jsonl(tmp_path, ["[" * 100_000])
    with pytest.raises(MetricsReadError, match=r"metrics\.jsonl:1: not a JSON line"):
        read_metrics({"reader": "jsonl"}, tmp_path, tmp_path / "log", 1)


def test_errors_are_record_errors():  # the CLI maps RecordError (an InputError) to one line and exit code 2
    assert issubclass(MetricsReadError, RecordError)


# --- validating the case file's table ------------------------------------------------------------


@pytest.mark.parametrize("table", [
    {"reader": "tensorboard"},
    {"reader": "tensorboard", "path": "tb/run1", "loss": "train/loss", "lr": "lr", "tokens": "ntok"},
    {"reader": "jsonl", "path": "metrics.jsonl", "step": "iter"},
    {"reader": "regex", "pattern": LOG_PATTERN + r" lr (?P<lr>\S+)", "exact": True},
])
def test_good_tables_have_no_problems(table):
    assert reader_problems(table) == []


@pytest.mark.parametrize("table, key, message", [
    ({"reader": "csv"}, "metrics.reader", "'csv' is not allowed; allowed: tensorboard, jsonl, regex"),
    ({"path": "tb"}, "metrics.reader", "missing; allowed: tensorboard, jsonl, regex"),
    ({"reader": "jsonl", "tag": "loss"}, "metrics.tag", "unknown key for reader \"jsonl\"; allowed: reader, path, step"),
    ({"reader": "tensorboard", "pattern": "x"}, "metrics.pattern", "unknown key for reader \"tensorboard\""),
    ({"reader": "regex", "pattern": "step (?P<step>\\d+) (?P<loss>[", "exact": False}, "metrics.pattern",
     "does not compile: "),
    ({"reader": "regex", "pattern": r"step (?P<step>\d+) grad (?P<grad_norm>\S+)"}, "metrics.pattern",
     "has no named group(s) loss;"),
    ({"reader": "regex", "pattern": LOG_PATTERN + r" (?P<ppl>\S+)"}, "metrics.pattern",
     "has named group(s) ppl that name no metric"),
    ({"reader": "regex"}, "metrics.pattern", "missing; the regex reader needs a pattern"),
    ({"reader": "regex", "pattern": LOG_PATTERN, "exact": "yes"}, "metrics.exact", "'yes' is not a boolean"),
    ({"reader": "jsonl", "path": "/tmp/metrics.jsonl"}, "metrics.path", "'/tmp/metrics.jsonl' is absolute"),
    ({"reader": "jsonl", "path": "logs/../../metrics.jsonl"}, "metrics.path", "leaves the command's output directory"),
    ({"reader": "tensorboard", "loss": 3}, "metrics.loss", "3 is not a non-empty string"),
    ("tensorboard", "metrics", "must be a table"),
])
def test_bad_tables_name_the_key(table, key, message):
    problems = reader_problems(table)
    assert problems and problems[0][0] == key and message in problems[0][1], problems


def test_read_metrics_refuses_an_unvalidated_table(tmp_path):
    with pytest.raises(MetricsReadError, match=r"metrics\.path: '\.\./x' leaves"):
        read_metrics({"reader": "jsonl", "path": "../x"}, tmp_path, tmp_path / "log", 1)


# --- tests/scripts/train_small.py ------------------------------------------------------------


def test_train_small_defaults_are_parity_train_defaults():
    import importlib.util

    from parity.case.schema import Train

    spec = importlib.util.spec_from_file_location("train_small", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # only defines things: main() runs under __main__ alone
    train = {f.name: f.default for f in dataclasses.fields(Train)}
    assert {k: train[k] for k in vars(module.DEFAULTS)} == vars(module.DEFAULTS)


@pytest.mark.slow
def test_train_small_routes_agree_and_scale_grad_doubles_the_norm(tmp_path, seed_cache):
    """Two short runs of the tiny model: the jsonl and log routes read back; --scale-grad 2 is visible."""
    from parity.trainers.seed import resolve_seed

    seed = resolve_seed("tiny", 42, "float32", cache=seed_cache).path

    def start(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, str(SCRIPT), "--seed-checkpoint", str(seed), "--out", str(out), "--steps", "2",
               "--model", "tiny", "--global-batch", "4", "--seq-len", "16", *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Both at once: each is one process on one thread, and most of its time is imports.
    procs = [start(tmp_path / "a", "--metrics", "jsonl"), start(tmp_path / "b", "--metrics", "log", "--scale-grad", "2")]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, f"exit {proc.returncode}: {stderr[-3000:]}"
    plain = read_metrics({"reader": "jsonl"}, tmp_path / "a", tmp_path / "a.log", 2)
    (tmp_path / "b.log").write_text(outputs[1][0])
    pattern = LOG_PATTERN + r" lr (?P<lr>\S+) tokens (?P<tokens>\d+)"
    scaled = read_metrics({"reader": "regex", "pattern": pattern, "exact": True}, tmp_path / "b", tmp_path / "b.log", 2)
    assert plain.rows[0]["tokens"] == scaled.rows[0]["tokens"] == 4 * 16
    assert [r["lr"] for r in plain.rows] == [r["lr"] for r in scaled.rows] == [0.0025, 0.005]
    assert bits(plain.rows[0]["loss"]) == bits(scaled.rows[0]["loss"])  # step 1's loss comes before the bug
    # Doubling every gradient doubles the norm exactly (a power of two scales every sum without rounding).
    assert bits(scaled.rows[0]["grad_norm"]) == bits(2 * plain.rows[0]["grad_norm"])
