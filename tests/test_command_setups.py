"""`trainer = "command"` setups end to end through the real runner: case file -> run_case -> verdict.

tests/scripts/train_small.py trains parity's own model the way the built-in world-size-1
`dp_api = "none"` setup does, so every route its metrics take back into parity (TensorBoard,
JSON lines, repr'd log lines) must agree with the built-in setup bit for bit; rounded log lines
must pass only by the allowance for their rounding; a planted x2 on the gradients must be caught at
step 1 on grad_norm; and a command that fails, writes nothing or hangs must be said so, with
nothing left running. Baselines are absent throughout (a tmp root): the assertions are on the
verdict between setups.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import struct
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parity.verdict.case_verdict import compare_case, load_run
from parity.verdict.formatting import format_verdict
from parity.verdict.pair import compare_pair

from parity.core import records
from parity.core.lifeline import alive
from parity.run.runner import run_case
from parity.session import judge
from parity.trainers import load_case

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "train_small.py"
STEPS = 3
TRAIN = f"""
[train]
model = "tiny"
steps = {STEPS}
global_batch = 4
seq_len = 16
"""
REFERENCE = """
[setups.builtin]
dp_api = "none"
"""
LOG_PATTERN = r"step (?P<step>\d+) loss (?P<loss>\S+) grad_norm (?P<grad_norm>\S+) lr (?P<lr>\S+) tokens (?P<tokens>\d+)"


def script_argv(route: str, *extra: str) -> str:
    """The argv of train_small.py as a TOML array: every [train] value passed through its placeholder."""
    argv = ["{python}", str(SCRIPT), "--seed-checkpoint", "{seed_checkpoint}", "--out", "{output_dir}",
            "--steps", "{steps}", "--metrics", route, "--model", "{model}", "--seed", "{seed}",
            "--global-batch", "{global_batch}", "--seq-len", "{seq_len}", "--lr", "{lr}",
            "--warmup-steps", "{warmup_steps}", "--max-norm", "{max_norm}", "--weight-decay", "{weight_decay}",
            "--dtype", "{dtype}", *extra]
    return json.dumps(argv)  # a JSON array of strings is a TOML array


def command_setup(name: str, route: str, metrics: str, *extra: str, weights: bool = False) -> str:
    argv = script_argv(route, *extra, *(["--weights-out", "{output_dir}/final.pt"] if weights else []))
    return (f'\n[setups.{name}]\ntrainer = "command"\nworld_size = 1\nargv = {argv}\nmetrics = {metrics}\n'
            + ('weights = "final.pt"\n' if weights else ""))


def regex_table(exact: bool) -> str:
    return f"{{ reader = \"regex\", pattern = '{LOG_PATTERN}', exact = {str(exact).lower()} }}"


def write_case(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return path


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def between_setups(case, out: Path, tmp_path: Path) -> dict:
    """The verdict through runner.judge (baselines missing: a tmp root), with its between-setups part checked too."""
    verdict = judge(case, out, tmp_path / "baselines", update=None)
    ok = {s.name for s in case.setups if records.read_json(out / case.name / s.name / "run.json")["status"] == "ok"}
    assert {b.setup: b.status for b in verdict.baselines if b.setup in ok} == dict.fromkeys(ok, "missing")
    return verdict


def pair(verdict: dict, other: str) -> dict:
    return next(p for p in verdict.pairs if p.other == other)


# --- a: each reader against the built-in setup -------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason='tensorboard not installed: pip install "parity[torchtitan]"')
def test_every_reader_matches_the_builtin_setup(tmp_path, seed_cache):
    body = (f'description = "train_small.py read back by each reader against the built-in setup"\n{TRAIN}{REFERENCE}'
            + command_setup("tb", "tensorboard", '{ reader = "tensorboard", lr = "lr", tokens = "tokens" }',
                            weights=True)
            + command_setup("jsonl", "jsonl", '{ reader = "jsonl" }', weights=True)
            + command_setup("log_exact", "log", regex_table(exact=True))
            + command_setup("log_rounded", "log", regex_table(exact=False), "--log-decimals", "5"))
    case = load_case(write_case(tmp_path / "cases", "readers", body))
    out = tmp_path / "out"
    results = run_case(case, out, "cpu", timeout_s=120, cache=seed_cache)
    assert {n: r.status for n, r in results.items()} == dict.fromkeys(("builtin", "tb", "jsonl", "log_exact",
                                                                       "log_rounded"), "ok"), results
    verdict = between_setups(case, out, tmp_path)
    # Only the missing baselines fail the case.
    assert [p for p in verdict.problems if not p.startswith("baseline ")] == []

    for name in ("tb", "jsonl", "log_exact"):
        p = pair(verdict, name)
        assert p.passed, (name, p.problems)
        assert p.modes == {"loss": "bitwise", "grad_norm": "bitwise", "weights": "bitwise"}, name
        for m in ("loss", "grad_norm"):
            assert p.metrics[m].exact_equal_steps == STEPS, (name, m, p.metrics[m])
            assert p.metrics[m].bitwise is True
        info = records.read_json(out / "readers" / name / "run.json")
        assert info["trainer"] == "command" and info["rounded"] == {}
        assert info["argv"][1] == str(SCRIPT) and info["cwd"] == str((tmp_path / "cases").resolve())
    for name in ("tb", "jsonl"):  # final weights: every parameter's sha256 equal to the built-in run's
        w = pair(verdict, name).metrics["weights"]
        assert "not_recorded" not in w.to_json() and w.n > 0 and w.exact_equal_steps == w.n, (name, w)
    unrecorded = pair(verdict, "log_exact").metrics["weights"]
    assert "log_exact" in unrecorded.not_recorded and unrecorded.passed
    assert "weights    not compared: log_exact recorded no final weights" in format_verdict(verdict)

    # The rounded log: compared within tolerance widened by the rounding, never bitwise.
    rounded = pair(verdict, "log_rounded")
    assert rounded.passed, rounded["problems"]
    assert rounded.modes["loss"] == rounded.modes["grad_norm"] == "tolerance"
    assert rounded.modes["weights"] == "bitwise"
    for m in ("loss", "grad_norm"):
        assert any(n.startswith(f"{m}: recorded from rounded log text") for n in rounded.notes), rounded["notes"]
        # ... and bitwise it would have failed: 5 decimals drop the last digits of every value.
        lane = rounded.metrics[m]
        assert lane.exact_equal_steps == 0 and lane.bitwise is False and lane.within_tolerance is True
        assert 0 < lane.max_abs <= 5e-6
    info = records.read_json(out / "readers" / "log_rounded" / "run.json")
    assert info["rounded"] == {"loss": 5e-6, "grad_norm": 5e-6, "lr": 5e-6}
    ref_rows = records.read_metrics(out / "readers" / "builtin" / "metrics.csv")
    printed = records.read_metrics(out / "readers" / "log_rounded" / "metrics.csv")
    assert len(ref_rows) == len(printed) == STEPS
    for a, b in zip(ref_rows, printed):
        for m in ("loss", "grad_norm"):  # what the script printed: the reference's value, to 5 decimals
            assert b[m] == float(f"{a[m]:.5f}") and bits(b[m]) != bits(a[m]), (m, a, b)
    # The same pair judged bitwise (the case's own mode, had the values carried every bit) fails.
    raw = {**load_run(out / "readers" / "log_rounded", "log_rounded")}
    assert (raw["metrics"]["loss_rounding"] == 5e-6).all() and (raw["metrics"]["grad_norm_rounding"] == 5e-6).all()
    raw["metrics"] = {k: v for k, v in raw["metrics"].items() if not k.endswith("_rounding")}  # columns
    ref = load_run(out / "readers" / "builtin", "builtin")
    strict = compare_pair("builtin", ref, "log_rounded", raw, case)
    assert not strict.passed and strict.diverged["metric"] == "loss" and strict.diverged["step"] == 1


# --- b: a planted bug is caught where it is planted ------------------------------------------


@pytest.mark.slow
def test_scaled_gradients_are_caught_at_step_1_on_grad_norm(tmp_path, seed_cache):
    """One run, judged by two case files of the same name: the negative control passes, `match` fails."""
    scaled = command_setup("scaled", "jsonl", '{ reader = "jsonl" }', "--scale-grad", "2")
    head = f'description = "train_small.py with every gradient doubled"\n{TRAIN}{REFERENCE}{scaled}'
    control = load_case(write_case(tmp_path / "diverge", "scaled", head + textwrap.dedent("""
        [expect]
        outcome = "diverge"
        first_divergence = { metric = "grad_norm", step = 1, ratio = 2.0, within = 1e-6 }
        """)))
    out = tmp_path / "out"
    results = run_case(control, out, "cpu", timeout_s=120, cache=seed_cache)
    assert {n: r.status for n, r in results.items()} == {"builtin": "ok", "scaled": "ok"}, results

    verdict = between_setups(control, out, tmp_path)
    p = pair(verdict, "scaled")
    assert p.passed, p.problems
    assert (p.diverged["metric"], p.diverged["step"]) == ("grad_norm", 1)
    assert p.effect["ratio"] == 2.0 and p.effect["problems"] == []  # x2 exactly: a power of two
    # Step 1's loss comes before the bug; after it, clipping and AdamW all but undo a x2 (a power of two).
    assert p.metrics["loss"].first_not_bitwise is None or p.metrics["loss"].first_not_bitwise["step"] > 1
    assert [x for x in verdict.problems if not x.startswith("baseline ")] == []

    # The same run, judged by a case that expects a match: it fails, first on grad_norm at step 1.
    match = load_case(write_case(tmp_path / "match", "scaled", head))
    assert match.name == control.name
    strict = compare_case(match, out)
    assert not strict.passed
    p = pair(strict, "scaled")
    assert not p.passed and (p.diverged["metric"], p.diverged["step"]) == ("grad_norm", 1)
    assert p.diverged["value_other"] == 2 * p.diverged["value_ref"]
    assert any(line.startswith("builtin vs scaled: grad_norm: 3 of 3 steps differ bitwise; first at step 1")
               for line in strict.problems), strict["problems"]


# --- c: commands that fail, write nothing, or hang ---------------------------------------------

GOOD = """import json, os, sys
out = sys.argv[1]
with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    for step in range(1, int(sys.argv[2]) + 1):
        f.write(json.dumps({"step": step, "loss": 1.0 / step, "grad_norm": 0.5}) + "\\n")
"""
CRASH = """import sys, traceback
print("train.py: CUDA out of memory (pretend)", flush=True)
try:
    assert 6 % (2 * 2) == 0, "global batch 6 is not a multiple of local batch 2 x data-parallel degree 2"
except AssertionError:
    traceback.print_exc()
    print("cleaning up", flush=True)
    sys.exit(3)
"""
SILENT = """print("trained, but forgot to write metrics", flush=True)
"""
# A long number that the regex setup's pattern below backtracks on for seconds (years at 40 digits).
BACKTRACK = """print("step 1 loss " + "1" * 26, flush=True)
"""
BACKTRACKING = r"step (?P<step>\d+) loss (?P<loss>(\d|\d)+)x grad_norm (?P<grad_norm>\S+)"
# A daemon: forks twice and leaves its session, so once the script exits it is neither the script's
# descendant nor in its process group. Its pid goes to leftover.pid; its argv names the output folder.
DAEMONIZE = """import os, sys
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1] + "/daemon"])
    with open(os.path.join(sys.argv[1], "leftover.pid"), "w") as f:
        f.write(str(pid))
    os._exit(0)
os.wait()
"""
DAEMON = DAEMONIZE + GOOD
# Writes its pid and a grandchild's (in a session of its own, as torchrun's workers are), starts a
# daemon, then hangs.
HANG = DAEMONIZE + """import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
with open(os.path.join(sys.argv[1], "pids.tmp"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}\\n")
os.replace(os.path.join(sys.argv[1], "pids.tmp"), os.path.join(sys.argv[1], "pids"))
time.sleep(120)
"""


@pytest.mark.slow
def test_failing_silent_and_hanging_commands_are_reported(tmp_path, seed_cache):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, text in (("good", GOOD), ("crash", CRASH), ("silent", SILENT), ("hang", HANG), ("backtrack", BACKTRACK),
                       ("daemon", DAEMON)):
        (cases / f"{name}.py").write_text(text)
    # A background child the shell leaves running when the training it exec'd into exits.
    background = ('\n[setups.background]\ntrainer = "command"\nworld_size = 1\nargv = ["sh", "-c", "{python} -c '
                  "'import time; time.sleep(600)' {output_dir}/background & echo $! > {output_dir}/leftover.pid; "
                  'exec {python} good.py {output_dir} {steps}"]\nmetrics = { reader = "jsonl" }\n')

    def setup(name: str, metrics: str = '{ reader = "jsonl" }') -> str:
        return (f'\n[setups.{name}]\ntrainer = "command"\nworld_size = 1\n'
                f'argv = ["{{python}}", "{name}.py", "{{output_dir}}", "{{steps}}"]\nmetrics = {metrics}\n')

    body = f'description = "commands that crash, write nothing or hang"\n{TRAIN}' + "".join(
        setup(n) for n in ("good", "crash", "silent", "hang", "daemon")) + setup(
        "backtrack", f"{{ reader = \"regex\", pattern = '{BACKTRACKING}' }}") + background
    case = load_case(write_case(cases, "broken", body))
    out = tmp_path / "out"
    pids: list[int] = []
    try:
        start = time.monotonic()
        results = run_case(case, out, "cpu", timeout_s=5, cache=seed_cache)
        took = time.monotonic() - start
        pid_file = out / "broken" / "hang" / "output" / "pids"
        assert pid_file.is_file(), "the hanging command never started"
        pids = [int(p) for p in pid_file.read_text().split()]
        pids += [int((out / "broken" / n / "output" / "leftover.pid").read_text()) for n in ("hang", "daemon", "background")]
        assert {n: r.status for n, r in results.items()} == {"good": "ok", "crash": "failed", "silent": "failed",
                                                             "hang": "timeout", "daemon": "ok", "backtrack": "failed",
                                                             "background": "ok"}, results
        assert took < 60, took
        # Nothing left behind: the command and its grandchild in another session are gone, and so are the
        # daemons (after an exit 0, and after the timeout) and the shell's background child.
        assert [p for p in pids if alive(p)] == []
        assert started_under(out) == {}

        runs = {n: records.read_json(out / "broken" / n / "run.json") for n in ("crash", "silent", "hang", "backtrack")}
        assert runs["crash"]["status"] == "failed"
        assert runs["crash"]["message"].splitlines()[0] == (  # the cause, from its traceback, in the first line
            "setup crash's command exited with code 3: AssertionError: global batch 6 is not a multiple of local "
            "batch 2 x data-parallel degree 2")
        assert "out of memory (pretend)" in runs["crash"]["message"]  # the log tail comes with it
        assert runs["silent"]["status"] == "failed"
        assert "exited 0" in runs["silent"]["message"] and "metrics.jsonl" in runs["silent"]["message"]
        assert "no such file" in runs["silent"]["message"]
        assert runs["hang"]["status"] == "timeout" and "timed out after 5 s" in runs["hang"]["message"]
        assert (out / "broken" / "crash" / "command.log").read_text().startswith("train.py: CUDA out of memory")
        # A pattern that backtracks catastrophically on the log fails its setup, on its line, within a second.
        assert runs["backtrack"]["message"] == (
            f"the command exited 0 but its records cannot be read: {out / 'broken' / 'backtrack' / 'command.log'}:1: "
            f"the regex reader's pattern {BACKTRACKING!r} took more than 1 s on one line (catastrophic backtracking?); "
            "allowed: a pattern that matches in linear time, e.g. (?P<loss>\\S+)")

        verdict = between_setups(case, out, tmp_path)
        assert not verdict.passed
        problems = [x for x in verdict.problems if not x.startswith("baseline ")]
        for name, status in (("crash", "failed"), ("silent", "failed"), ("hang", "timeout"), ("backtrack", "failed")):
            assert not pair(verdict, name).passed
            assert any(line.startswith(f"good vs {name}: {name}: run status is '{status}'") for line in problems), \
                (name, problems)
        assert any("metrics.jsonl" in line for line in problems if "silent" in line), problems
    finally:
        for pid in [*pids, *started_under(out)]:  # only if the harness failed to: never leave our own processes running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def started_under(folder: Path) -> dict[int, str]:
    """Live processes whose command line names `folder`: everything a run under it started (its argv holds
    {output_dir}), and nothing that tests beside it started."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
        except OSError:
            continue
        if str(folder).encode() in cmd and alive(int(entry)):
            found[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace")
    return found


@pytest.mark.parametrize("decimals", [0, 5])
def test_train_small_log_decimals_prints_rounded_text(decimals, tmp_path):
    """--log-decimals only changes how the log route prints: a parse check, no training run."""
    spec = importlib.util.spec_from_file_location("train_small", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--seed-checkpoint", "x", "--out", str(tmp_path), "--steps", "1", "--metrics", "log",
                              "--log-decimals", str(decimals)])
    out = module.MetricsOut("log", tmp_path, args.log_decimals)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out.step(2, 8.074956893920898, 0.36990073323249817, 0.005, 64)
    expected = {0: "step 2 loss 8 grad_norm 0 lr 0 tokens 64\n",
                5: "step 2 loss 8.07496 grad_norm 0.36990 lr 0.00500 tokens 64\n"}[decimals]
    assert buf.getvalue() == expected
    with pytest.raises(SystemExit):
        module.parse_args(["--seed-checkpoint", "x", "--out", "o", "--steps", "1", "--metrics", "jsonl",
                           "--log-decimals", "3"])


DESCRIPTION = 'description = "a command setup against the built-in one"\n'


def test_a_reader_whose_package_is_missing_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """Found when the device is chosen, before any training, not when its records are read afterwards."""
    from parity.core.errors import InputError
    from parity.run.runner import resolve_device

    case = load_case(write_case(tmp_path, "tb", DESCRIPTION + TRAIN + REFERENCE + command_setup(
        "cmd", "tensorboard", '{ reader = "tensorboard", path = "tb" }')))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as the import system sees an absent package
    with pytest.raises(InputError, match=r"setups.cmd.metrics: the tensorboard reader needs the tensorboard "
                                         r"package, which is not installed; install with: pip install tensorboard"):
        resolve_device("cpu", case)
    jsonl = load_case(write_case(tmp_path, "jl", DESCRIPTION + TRAIN + REFERENCE + command_setup(
        "cmd", "jsonl", '{ reader = "jsonl", path = "metrics.jsonl" }')))
    assert resolve_device("cpu", jsonl) == "cpu"  # a reader of parity's own needs nothing more
