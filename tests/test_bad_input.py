"""Bad-input sweep (issue 8): every hostile-but-fair mistake is exit 2, one line, nothing written, nothing launched.

Each input below is one row: an id, the files it writes (on top of a small valid workspace), the
`parity` argv, and the substrings its one error line must contain. `parity.cli.main` runs in
process. For every row:

- the exit code is 2 (argparse-level rows may instead raise SystemExit(2) with usage + error lines,
  the last line naming the option);
- stderr is exactly one non-empty line starting with `parity: error:`, without "Traceback", naming
  what is at fault;
- nothing under the test's tmp folder changed (paths, bytes, mtimes), `--out` was not created, and
  the sentinel files beside `--out` and `--baselines` are untouched;
- no process was started and no seed checkpoint was built (guards below turn either into a failure
  before it can do anything), and the seed cache ($PARITY_CACHE) stays empty.

Workspace (W = tmp_path / "w"; the working directory during the call):

    W/SENTINEL
    W/cases/pair.toml              a valid two-setup case (tiny model, 1 rank, 3 steps)
    W/runs/sub/SENTINEL            beside --out
    W/runs/sub/out                 --out (absent)
    W/bl/SENTINEL                  beside --baselines
    W/bl/baselines/pair/*.cpu.csv  --baselines, matching the run below exactly
    W/run/pair/<setup>/...         a finished run of pair.toml, written by hand (run.json, metrics.csv, weights.csv)
    W/cache/                       $PARITY_CACHE (empty)

Paths are nested deep enough that a name with `../../../` or a deleted parent still lands inside
tmp_path, and "absolute" names point inside tmp_path: the current code must not harm anything
while it is being fixed.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from parity import cli

# ----------------------------------------------------------------------------- filesystem helpers


def snapshot(top: Path) -> dict[str, tuple]:
    """Every path under `top` (not following links): dirs, links, and files with bytes and mtime."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            st = os.lstat(p)
            if p.is_symlink():
                state[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                state[rel] = ("dir",)
            elif not stat.S_ISREG(st.st_mode):  # a FIFO: reading it would block
                state[rel] = ("special", st.st_mode)
            else:
                state[rel] = ("file", p.read_bytes(), st.st_mtime_ns)
    return state


def snapshot_diff(before: dict, after: dict) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    out = [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]
    return out[:6] + ([f"... {len(out) - 6} more"] if len(out) > 6 else [])


SENTINELS = ("SENTINEL", "runs/sub/SENTINEL", "bl/SENTINEL")
OUT = "runs/sub/out"
BL = "bl/baselines"
RUN = "run"


class ReachedLaunch(BaseException):
    """Raised by the guards: the input got as far as starting a process, building a seed or deleting outside tmp.

    A BaseException so that no `except Exception` in the code under test can swallow it.
    """


def install_guards(monkeypatch, tmp_path: Path) -> list[str]:
    events: list[str] = []

    class NoPopen:
        def __init__(self, args, *a, **k):
            events.append(f"started a process: {args!r:.120}")
            raise ReachedLaunch(events[-1])

    monkeypatch.setattr(subprocess, "Popen", NoPopen)

    import parity.rank.model

    def no_build(*a, **k):
        events.append("built a seed checkpoint")
        raise ReachedLaunch(events[-1])

    monkeypatch.setattr(parity.rank.model, "build_model", no_build)

    real_rmtree = shutil.rmtree
    top = tmp_path.resolve()
    scratch = Path(tempfile.gettempdir()).resolve()

    def rmtree_inside_tmp(path, *a, **k):
        p = Path(path).resolve()
        own_scratch = p.parent == scratch and p.name.startswith("tmp")  # a tempfile.TemporaryDirectory()
        if p != top and top not in p.parents and not own_scratch:
            events.append(f"rmtree outside tmp: {p}")
            raise ReachedLaunch(events[-1])
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree_inside_tmp)
    return events


# ----------------------------------------------------------------------------- the valid workspace

TRAIN = {"model": '"tiny"', "steps": "3", "global_batch": "4", "seq_len": "16"}
SETUP = 'dp_api = "none"'


def case(train=None, setups=None, top="", expect="", description=True) -> str:
    """A case file: the valid pair.toml with `train` keys overridden (None drops one), other setups, extra text."""
    t = dict(TRAIN)
    t.update(train or {})
    lines = ['description = "two single-rank setups that must agree"'] if description else []
    lines += [top, "[train]"] + [f"{k} = {v}" for k, v in t.items() if v is not None]
    for name, body in (setups if setups is not None else [("ref", SETUP), ("other", SETUP)]):
        lines += [f"[setups.{json.dumps(name)}]", body]
    if expect:
        lines += ["[expect]", expect]
    return "\n".join(lines) + "\n"


SETUP_NAMES = ("ref", "other")
TORCH = "2.13.0+cpu"
CAPABILITY = "AVX512"
METRICS = [(1, 5.545177459716797, 1.2345678901234567, 0.0004, 64, 0.011),
           (2, 5.412345678901234, 1.1876543210987654, 0.0008, 128, 0.012),
           (3, 5.301234567890123, 1.0987654321098765, 0.0008, 192, 0.013)]


def metrics_csv(columns=("step", "loss", "grad_norm", "lr", "tokens", "step_time_s"), rows=METRICS) -> str:
    all_cols = ("step", "loss", "grad_norm", "lr", "tokens", "step_time_s")
    idx = [all_cols.index(c) for c in columns]
    return ",".join(columns) + "\n" + "".join(",".join(repr(r[i]) for i in idx) + "\n" for r in rows)


WEIGHTS_CSV = ("param,norm,sha256\n"
               "tok_embeddings.weight,11.313708305358887," + "ab" * 32 + "\n"
               "output.weight,7.999999523162842," + "cd" * 32 + "\n")


def run_json(setup: str, **over) -> str:
    d = {"case": "pair", "setup": setup, "status": "ok", "device": "cpu", "platform": "cpu", "torch": TORCH,
         "cpu_capability": CAPABILITY, "backend": "gloo", "world_size": 1, "mesh_shape": None,
         "mesh_dim_names": None, "seed_checkpoint": "/nonexistent/seed", "seed_checkpoint_sha256": "0" * 64,
         "case_sha256": "1" * 64, "git_commit": "unknown", "command": ["parity", "run", "cases/pair.toml"],
         "started": "2026-01-01T00:00:00+00:00", "ended": "2026-01-01T00:00:01+00:00"}
    d.update(over)
    return json.dumps(d, indent=2) + "\n"


def baseline_csv(setup: str, platform: str = "cpu", columns=("step", "loss", "grad_norm", "lr", "tokens")) -> str:
    prov = {"torch": TORCH, "device": "cpu", "platform": platform, "cpu_capability": CAPABILITY, "world_size": 1,
            "mesh": "none", "seed_checkpoint_sha256": "0" * 64, "case_sha256": "1" * 64,
            "date": "2026-01-01T00:00:00+00:00", "git_commit": "unknown", "case": "pair", "setup": setup}
    return "".join(f"# {k}: {v}\n" for k, v in prov.items()) + metrics_csv(columns)


def base_files() -> dict[str, str | bytes]:
    files = {s: f"sentinel {s}\n" for s in SENTINELS}
    files["cases/pair.toml"] = case()
    for s in SETUP_NAMES:
        files[f"{BL}/pair/{s}.cpu.csv"] = baseline_csv(s)
        files[f"{RUN}/pair/{s}/run.json"] = run_json(s)
        files[f"{RUN}/pair/{s}/metrics.csv"] = metrics_csv()
        files[f"{RUN}/pair/{s}/weights.csv"] = WEIGHTS_CSV
    return files


def write_files(root: Path, files: dict):
    for rel, content in files.items():
        p = root / rel
        if content is None:
            p.unlink()
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content.replace("{W}", str(root)))


def npy(array) -> callable:
    def write(path: Path):
        with open(path, "wb") as f:  # np.save(f, ...) never appends a second ".npy"
            np.save(f, array, allow_pickle=True)
    return write


def mkdir(path: Path):
    path.mkdir(parents=True, exist_ok=True)


def fifo(path: Path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def symlink_to(target: str) -> callable:
    def write(path: Path):
        path.symlink_to(path.parent / target)
    return write


def marker(*entries: str) -> str:
    return json.dumps({"kind": "parity run directory", "entries": list(entries)})


# ----------------------------------------------------------------------------- the inputs


class Any:
    """An expected substring where any one of several wordings names the fault."""

    def __init__(self, *options: str):
        self.options = options

    def found_in(self, line: str) -> bool:
        return any(o in line for o in self.options)

    def __repr__(self):
        return " or ".join(map(repr, self.options))


@dataclass
class Bad:
    id: str
    argv: list[str]
    expect: tuple  # substrings (str or Any) the error line must all contain
    files: dict = field(default_factory=dict)  # W-relative path -> text ("{W}" expanded) | bytes | writer | None (delete)
    env: dict = field(default_factory=dict)  # "{W}" expanded
    usage: bool = False  # an argparse-level value: SystemExit(2) with usage + "error:" line naming the option is fine


def run(*args: str) -> list[str]:
    return ["run", *args, "--device", "cpu", "--out", "{W}/" + OUT, "--baselines", "{W}/" + BL]


def compare(*args: str) -> list[str]:
    return ["compare", "{W}/" + RUN, "{W}/cases/pair.toml", "--baselines", "{W}/" + BL, *args]


def case_file(id, name, text, *expect) -> Bad:
    """A case file named `name` in W/cases, run on its own."""
    return Bad(id, run("{W}/cases/" + name), expect or (name,), {f"cases/{name}": text})


def setup_name(id, name, *expect) -> Bad:
    """A valid case but for one setup's name."""
    return Bad(id, run("{W}/cases/names.toml"), expect or ("setups",),
               {"cases/names.toml": case(setups=[("ref", SETUP), (name, SETUP)])})


def content(id, text, *expect) -> Bad:
    return Bad(id, run("{W}/cases/c.toml"), expect, {"cases/c.toml": text})


def data(id, filename, writer, *expect, model="tiny", where="train") -> Bad:
    """train.data (or setups.other.data) pointing at a token file `filename` next to the case."""
    if where == "train":
        text = case(train={"model": json.dumps(model), "data": json.dumps(filename)})
    else:
        text = case(train={"model": json.dumps(model)},
                    setups=[("ref", SETUP), ("other", SETUP + f"\ndata = {json.dumps(filename)}")])
    files = {"cases/d.toml": text}
    if writer is not None:
        files[f"cases/{filename}"] = writer
    return Bad(id, run("{W}/cases/d.toml"), expect or (Path(filename).name,), files)


def cli_value(id, *extra, expect) -> Bad:
    return Bad(id, run("{W}/cases/pair.toml", *extra), (expect,), usage=True)


GOOD_TOKENS = np.arange(200, dtype=np.int64) % 256
BINARY = bytes(range(256)) * 4  # not UTF-8, not TOML, not JSON, not a pickle (0x00 is no opcode)

INPUTS = [
    # 1. case file names: the stem is the case name and becomes a folder under --out and --baselines
    case_file("case-file-..toml", "..toml", case()),
    case_file("case-file-...toml", "...toml", case()),
    case_file("case-name-hidden", ".hidden.toml", case()),
    case_file("case-name-space", "has space.toml", case(), "has space"),
    case_file("case-name-non-ascii", "café.toml", case(), "caf"),
    case_file("case-name-200-chars", "x" * 200 + ".toml", case(), "x" * 40),
    case_file("case-name-65-chars", "y" * 65 + ".toml", case(), "y" * 40),
    case_file("case-name-leading-dash", "-rf.toml", case(), "-rf"),
    case_file("case-name-with-dot", "v1.2.toml", case(), "v1.2"),
    Bad("case-dir-holding-bad-name", run("{W}/dircase"), ("bad name",),
        {"dircase/good.toml": case(), "dircase/bad name.toml": case()}),
    Bad("case-dir-holding-dotdot-file", run("{W}/dircase"), (Any("...toml", "'..'", '".."'),),
        {"dircase/good.toml": case(), "dircase/...toml": case()}),
    Bad("case-names-differ-only-in-case", run("{W}/cases/Mixed.toml", "{W}/cases/mixed.toml"), (Any("Mixed", "mixed"),),
        {"cases/Mixed.toml": case(), "cases/mixed.toml": case()}),
    Bad("case-names-same-stem-two-dirs", run("{W}/d1/twin.toml", "{W}/d2/twin.toml"), ("twin",),
        {"d1/twin.toml": case(), "d2/twin.toml": case()}),
    Bad("calibrate-case-name-dotdot", ["calibrate", "{W}/cases/...toml", "--out", "{W}/" + OUT], ("...toml",),
        {"cases/...toml": case()}),

    # 2. setup names: each becomes a folder under --out/<case>/ and a <setup>.<platform>.csv baseline
    setup_name("setup-parent-escape", "../../../X", "../../../X"),
    setup_name("setup-absolute-path", "{W}/abs_escape", "abs_escape"),
    setup_name("setup-empty", ""),
    setup_name("setup-newline", "a\nb"),
    setup_name("setup-dot", "."),
    setup_name("setup-dotdot", ".."),
    setup_name("setup-slash", "a/b", "a/b"),
    setup_name("setup-dotted", "a.b", "a.b"),
    setup_name("setup-nul-byte", "a\0b"),
    setup_name("setup-non-ascii", "b\u00e4r"),
    setup_name("setup-leading-dash", "-x", "-x"),
    setup_name("setup-65-chars", "s" * 65, "s" * 40),
    Bad("setup-names-differ-only-in-case", run("{W}/cases/names.toml"),
        ("setups", Any("Ref", "setups.ref", "'ref'", '"ref"')),
        {"cases/names.toml": case(setups=[("Ref", SETUP), ("ref", SETUP)])}),

    # 3. case content
    case_file("content-not-toml", "broken.toml", 'description = "x"\n[train\nsteps = \n', "broken.toml"),
    Bad("content-binary", run("{W}/cases/blob.toml"), ("blob.toml",), {"cases/blob.toml": BINARY}),
    case_file("content-empty-file", "empty.toml", "", "empty.toml"),
    content("unknown-key-top", case(top="bogus_top = 1"), "bogus_top"),
    content("unknown-key-train", case(train={"bogus_train": "1"}), "train.bogus_train"),
    content("unknown-key-setup", case(setups=[("ref", SETUP), ("other", SETUP + "\nwat = 2")]), "setups.other.wat"),
    content("unknown-key-expect", case(expect="bogus_expect = 1"), "expect.bogus_expect"),
    content("unknown-key-tolerance-metric", case(expect='mode = "tolerance"\n[expect.tolerance]\nperplexity = { rtol = 1e-3 }'),
            "expect.tolerance.perplexity"),
    content("unknown-key-tolerance-bound", case(expect='mode = "tolerance"\n[expect.tolerance]\nloss = { ptol = 1e-3 }'),
            "expect.tolerance.loss.ptol"),
    content("unknown-key-first-divergence",
            case(expect='outcome = "diverge"\nfirst_divergence = { metric = "loss", step = 2, when = "early" }'),
            "expect.first_divergence.when"),
    content("type-steps-string", case(train={"steps": '"10"'}), "train.steps"),
    content("type-tp-bool", case(setups=[("ref", SETUP), ("other", SETUP + "\ntp = true")]), "setups.other.tp"),
    content("type-steps-float", case(train={"steps": "3.0"}), "train.steps"),
    content("lr-negative", case(train={"lr": "-0.001"}), "train.lr"),
    content("lr-nan", case(train={"lr": "nan"}), "train.lr"),
    content("lr-inf", case(train={"lr": "inf"}), "train.lr"),
    content("max-norm-negative", case(train={"max_norm": "-1"}), "train.max_norm"),
    content("steps-10^12", case(train={"steps": str(10**12)}), "train.steps"),
    content("seq-len-10^9", case(train={"seq_len": str(10**9)}), "train.seq_len"),
    content("global-batch-10^9", case(train={"global_batch": str(10**9)}), "train.global_batch"),
    content("world-size-4096-dp-replicate",
            case(train={"global_batch": "16384"},
                 setups=[("ref", SETUP), ("other", 'dp_api = "replicate"\ndp_replicate = 4096')]), "setups.other"),
    content("world-size-4096-dp-shard-fill",
            case(train={"global_batch": "16384"},
                 setups=[("ref", SETUP), ("other", 'dp_api = "fully_shard"\ndp_shard = -1\nworld_size = 4096')]),
            "setups.other"),
    content("microbatches-2^20",
            case(setups=[("ref", SETUP), ("other", SETUP + f"\nmicrobatches = {2**20}")]), "setups.other.microbatches"),
    content("seed-2^70", case(train={"seed": str(2**70)}), "train.seed"),
    content("first-divergence-after-last-step",
            case(expect='outcome = "diverge"\nfirst_divergence = { metric = "loss", step = 50 }'), "first_divergence"),
    content("unknown-preset", case(train={"model": '"llama-70b"'}), "train.model"),
    content("bad-dtype", case(train={"dtype": '"float16"'}), "train.dtype"),
    content("bad-attention", case(train={"attention": '"sdpa"'}), "train.attention"),
    content("tp-not-dividing-heads", case(setups=[("ref", SETUP), ("other", 'dp_api = "fully_shard"\ntp = 3')]),
            "setups.other.tp"),
    content("replicate-with-dp-shard-2",
            case(setups=[("ref", SETUP), ("other", 'dp_api = "replicate"\ndp_shard = 2')]), "setups.other.dp_shard"),
    content("only-one-setup", case(setups=[("ref", SETUP)]), "setups"),
    content("setups-not-a-table", case(setups=[]).replace("[train]", 'setups = 3\n[train]'), "setups"),
    content("no-description", case(description=False), "description"),
    content("seed-checkpoint-missing-dir", case(top='seed_checkpoint = "no_such_seed"'), "seed_checkpoint"),
    Bad("seed-checkpoint-is-a-file", run("{W}/cases/c.toml"), ("seed_checkpoint",),
        {"cases/c.toml": case(top='seed_checkpoint = "seedfile"'), "cases/seedfile": "not a checkpoint\n"}),
    Bad("seed-checkpoint-garbage-metadata", run("{W}/cases/c.toml"), (Any("seed_checkpoint", "garbage_seed"),),
        {"cases/c.toml": case(top='seed_checkpoint = "garbage_seed"'), "cases/garbage_seed/.metadata": BINARY,
         "cases/garbage_seed/__0_0.distcp": BINARY}),

    # 4. token data files: checked before any rank starts
    data("data-float32", "f32.npy", npy(np.arange(200, dtype=np.float32))),
    data("data-2d", "twod.npy", npy(np.arange(400, dtype=np.int64).reshape(2, 200) % 256)),
    data("data-too-short", "short.npy", npy(np.arange(10, dtype=np.int64))),
    data("data-id-at-vocab-tiny", "big256.npy", npy(np.append(GOOD_TOKENS, 256))),
    data("data-id-at-vocab-debugmodel", "big2048.npy", npy(np.append(np.arange(200, dtype=np.int64), 2048)),
         model="debugmodel"),
    data("data-negative-id", "neg.npy", npy(np.append(GOOD_TOKENS, -1))),
    data("data-text-renamed-npy", "text.npy", "1 2 3 4 5 6 7 8 9 10\n" * 40),
    data("data-object-array-pickle", "obj.npy", npy(np.array([1, "two", None] * 70, dtype=object))),
    data("data-missing-file", "missing.npy", None),
    data("data-escapes-to-missing", "../../nowhere/x.npy", None, "nowhere"),
    data("data-is-a-directory", "dir.npy", mkdir),
    # A setup may not read other data than the rest of the case: rejected before the file is read.
    data("data-in-setup", "f32b.npy", npy(np.arange(200, dtype=np.float32)), "setups.other.data", "may not override data",
         where="setup"),

    # 5. command-line values (argparse may reject these itself: usage + error line naming the option)
    cli_value("cli-timeout-nan", "--timeout", "nan", expect="--timeout"),
    cli_value("cli-timeout-inf", "--timeout", "inf", expect="--timeout"),
    cli_value("cli-timeout-0", "--timeout", "0", expect="--timeout"),
    cli_value("cli-timeout-negative", "--timeout", "-1", expect="--timeout"),
    cli_value("cli-steps-0", "--steps", "0", expect="--steps"),
    cli_value("cli-steps-10^10", "--steps", str(10**10), expect="--steps"),
    cli_value("cli-update-baselines-bogus", "--update-baselines", "bogus", expect="--update-baselines"),
    cli_value("cli-device-tpu", "--device", "tpu", expect="--device"),
    Bad("cli-case-path-missing", run("{W}/cases/nope.toml"), ("nope.toml",)),
    # A case name is looked up in the cases folder (W/cases: the default, relative to W); a miss names the closest.
    Bad("cli-case-name-misspelt", run("pai"), ("pai", "cases/pai.toml", "did you mean: pair?")),
    Bad("cli-case-name-unknown", run("zzz"), ("zzz", "cases/zzz.toml", "searched cases")),
    Bad("cli-case-path-misspelt", run("{W}/cases/pairr.toml"), ("pairr.toml", "did you mean: ", "/cases/pair.toml?")),
    Bad("compare-case-name-misspelt", ["compare", "{W}/" + RUN, "pai", "--baselines", "{W}/" + BL],
        ("pai", "did you mean: pair?")),
    Bad("locate-case-name-misspelt", ["locate", "{W}/" + RUN, "pai"], ("pai", "did you mean: pair?")),
    Bad("locate-case-not-in-run", ["locate", "{W}/" + RUN, "pairs"], ("no run of case pairs", "did you mean: pair?"),
        {"cases/pairs.toml": case()}),
    Bad("evidence-case-name-misspelt", ["evidence", "{W}/" + RUN, "--case", "pai"],
        ("--case", "no run of case pai", "did you mean: pair?")),
    Bad("evidence-case-path-not-in-run", ["evidence", "{W}/" + RUN, "--case", "{W}/cases/zzz.toml"],
        ("--case", "no run of case zzz")),
    Bad("cli-run-empty-cases-dir", run("{W}/emptycases"), (Any("no case files", "emptycases"),),
        {"emptycases": mkdir}),
    Bad("cli-compare-empty-cases-dir", ["compare", "{W}/" + RUN, "{W}/emptycases", "--baselines", "{W}/" + BL],
        (Any("no case files", "emptycases"),), {"emptycases": mkdir}),
    Bad("cli-out-is-a-file", ["run", "{W}/cases/pair.toml", "--device", "cpu", "--out", "{W}/runs/sub/outfile",
                              "--baselines", "{W}/" + BL], ("outfile",), {"runs/sub/outfile": "a file\n"}),
    Bad("cli-out-parent-is-a-file", ["run", "{W}/cases/pair.toml", "--device", "cpu", "--out", "{W}/runs/sub/afile/out",
                                     "--baselines", "{W}/" + BL], ("afile",), {"runs/sub/afile": "a file\n"}),

    # 6. parity compare on a run folder (copied from a cluster, say) and baselines that are broken
    Bad("compare-run-dir-missing", ["compare", "{W}/norun", "{W}/cases/pair.toml", "--baselines", "{W}/" + BL],
        ("norun",)),
    Bad("compare-run-dir-lacks-case", ["compare", "{W}/otherrun", "{W}/cases/pair.toml", "--baselines", "{W}/" + BL],
        ("otherrun",), {"otherrun/unrelated.txt": "x\n"}),
    Bad("compare-run-json-binary", compare(), ("run.json",), {f"{RUN}/pair/other/run.json": BINARY}),
    Bad("compare-run-json-list", compare(), ("run.json",), {f"{RUN}/pair/other/run.json": "[]\n"}),
    Bad("compare-run-json-null", compare(), ("run.json",), {f"{RUN}/pair/other/run.json": "null\n"}),
    Bad("compare-run-json-empty-object", compare(), ("run.json",), {f"{RUN}/pair/other/run.json": "{}\n"}),
    Bad("compare-run-json-platform-escapes", compare("--update-baselines=new"), ("platform",),
        {f"{RUN}/pair/other/run.json": run_json("other", platform="x/../../../../E")}),
    Bad("compare-metrics-missing-column", compare(), ("metrics.csv",),
        {f"{RUN}/pair/other/metrics.csv": metrics_csv(("step", "loss", "lr", "tokens", "step_time_s"))}),
    Bad("compare-metrics-binary", compare(), ("metrics.csv",), {f"{RUN}/pair/other/metrics.csv": BINARY}),
    Bad("compare-metrics-non-number", compare(), ("metrics.csv",),
        {f"{RUN}/pair/other/metrics.csv": metrics_csv().replace("5.412345678901234", "five")}),
    Bad("compare-weights-binary", compare(), ("weights.csv",), {f"{RUN}/pair/other/weights.csv": BINARY}),
    Bad("compare-baseline-missing-column", compare(), ("other.cpu.csv",),
        {f"{BL}/pair/other.cpu.csv": baseline_csv("other", columns=("step", "loss", "lr", "tokens"))}),
    Bad("compare-baseline-binary", compare(), ("other.cpu.csv",), {f"{BL}/pair/other.cpu.csv": BINARY}),
    Bad("compare-baseline-cpu-name-cuda-provenance", compare(), ("other.cpu.csv",),
        {f"{BL}/pair/other.cpu.csv": baseline_csv("other", platform="cuda-h100")}),

    # 7. report, evidence, baselines lint
    Bad("report-missing-dir", ["report", "{W}/nothere"], ("nothere",)),
    Bad("report-on-a-file", ["report", "{W}/afile"], ("afile",), {"afile": "x\n"}),
    Bad("report-empty-dir", ["report", "{W}/emptyrun"], ("emptyrun",), {"emptyrun": mkdir}),
    Bad("report-against-missing", ["report", "{W}/" + RUN, "--against", "{W}/oldrun"], ("oldrun",)),
    Bad("evidence-missing-dir", ["evidence", "{W}/nothere"], ("nothere",)),
    Bad("evidence-on-a-file", ["evidence", "{W}/afile"], ("afile",), {"afile": "x\n"}),
    Bad("evidence-empty-dir", ["evidence", "{W}/emptyrun"], ("emptyrun",), {"emptyrun": mkdir}),
    Bad("lint-baselines-missing-dir", ["baselines", "lint", "--baselines", "{W}/nobl"], ("nobl",)),
    Bad("lint-baselines-is-a-file", ["baselines", "lint", "--baselines", "{W}/blfile"], ("blfile",), {"blfile": "x\n"}),
    # (a binary file *inside* a valid baseline root is a lint finding, not bad input: see the test at the end)

    # 8. the seed cache
    Bad("seed-cache-is-a-file", run("{W}/cases/pair.toml"), ("cachefile",), {"cachefile": "x\n"},
        env={"PARITY_CACHE": "{W}/cachefile"}),
]


# 9. `trainer = "command"` and `trainer = "torchtitan"` setups: their keys are checked with the case, before
#    anything starts. CMD and TITAN are valid (test_control_valid_external_setups_load); each row changes one thing.
CMD_ARGV = '["{python}", "train.py", "--out", "{output_dir}", "--steps", "{steps}"]'
CMD = 'trainer = "command"\nworld_size = 1\nargv = ' + CMD_ARGV + '\nmetrics = { reader = "jsonl" }'
TITAN = 'trainer = "torchtitan"\nworld_size = 1'
TITAN_TRAIN = {"model": None}  # torchtitan trains its own model: [train] gives steps and sizes only


def cmd(id, body, *expect) -> Bad:
    """The valid case with its second setup a command setup: CMD with `body` lines replacing or adding keys."""
    return content(id, case(setups=[("ref", SETUP), ("cmd", body)]), *expect)


def cmd_without(key: str) -> str:
    return "\n".join(line for line in CMD.split("\n") if not line.startswith(key + " "))


def titan(id, setups, *expect, train=None) -> Bad:
    return content(id, case(train={**TITAN_TRAIN, **(train or {})}, setups=setups), *expect)


INPUTS += [
    cmd("command-unknown-trainer", CMD.replace('"command"', '"deepspeed"'), "setups.cmd.trainer", "deepspeed"),
    cmd("command-without-argv", cmd_without("argv"), "setups.cmd.argv", "required"),
    cmd("command-argv-not-a-list", cmd_without("argv") + '\nargv = "python train.py"', "setups.cmd.argv"),
    cmd("command-argv-unknown-placeholder", CMD.replace("{steps}", "{stepz}"), "setups.cmd.argv[5]", "{stepz}"),
    cmd("command-without-metrics", cmd_without("metrics"), "setups.cmd.metrics", "required"),
    cmd("command-metrics-reader-csv", CMD.replace('"jsonl"', '"csv"'), "setups.cmd.metrics.reader", "'csv'"),
    cmd("command-regex-without-loss-group",
        cmd_without("metrics") + "\nmetrics = { reader = \"regex\", pattern = 'step (?P<step>\\d+) "
        "grad_norm (?P<grad_norm>\\S+)' }", "setups.cmd.metrics.pattern", "loss"),
    cmd("command-metrics-path-dotdot", CMD.replace('"jsonl"', '"jsonl", path = "../x"'),
        "setups.cmd.metrics.path", "../x"),
    cmd("command-metrics-path-absolute", CMD.replace('"jsonl"', '"jsonl", path = "/etc/passwd"'),
        "setups.cmd.metrics.path", "/etc/passwd"),
    cmd("command-weights-dotdot", CMD + '\nweights = "../w.pt"', "setups.cmd.weights", "../w.pt"),
    # A placeholder expands to an absolute path: output_dir / "/abs" is "/abs", outside the output directory.
    cmd("command-weights-placeholder-escapes", CMD + '\nweights = "{seed_checkpoint}"', "setups.cmd.weights",
        "{seed_checkpoint}"),
    cmd("command-without-world-size", cmd_without("world_size"), "setups.cmd.world_size", "required"),
    cmd("command-with-builtin-key", CMD + "\ndp_shard = 2", "setups.cmd.dp_shard"),
    content("builtin-with-command-key", case(setups=[("ref", SETUP), ("other", SETUP + "\nargv = " + CMD_ARGV)]),
            "setups.other.argv", 'trainer = "command"'),
    titan("titan-with-builtin-lr", [("tt1", TITAN), ("tt2", TITAN + "\nlr = 0.1")], "setups.tt2.lr"),
    titan("titan-args-set-steps", [("tt1", TITAN), ("tt2", TITAN + '\nargs = ["--training.steps=3"]')],
          "setups.tt2.args[0]", "--training.steps"),
    titan("titan-ref-without-source", [("tt1", TITAN), ("tt2", TITAN + '\nref = "main"')], "setups.tt2.ref",
          "source"),
    titan("titan-ref-is-an-option", [("tt1", TITAN), ("tt2", TITAN + '\nsource = "."\nref = "--upload-pack=x"')],
          "setups.tt2.ref", "--upload-pack=x"),
    titan("titan-mixed-with-builtin", [("ref", SETUP), ("tt", TITAN)], "setups.tt.trainer", "built-in setup ref"),
    titan("titan-configs-differ", [("tt1", TITAN), ("tt2", TITAN + '\nconfig = "llama3_8b"')], "setups.tt2.config",
          "llama3_8b"),
    titan("titan-train-lr-unused", [("tt1", TITAN), ("tt2", TITAN)], "train.lr", train={"lr": "0.1"}),
    content("localized-but-probes-off", case(setups=[("ref", SETUP), ("other", SETUP)], top="",
                                             expect='outcome = "diverge"\nlocalized = { step = 1, phase = "forward", '
                                                    'name = "tok_embeddings" }\n[probes]\nenabled = false'),
            "expect.localized.step", "not a probed step"),
    Bad("calibrate-torchtitan-reference", ["calibrate", "{W}/cases/t.toml", "--out", "{W}/" + OUT],
        ("setups.tt1.trainer", "built-in reference"),
        {"cases/t.toml": case(train=TITAN_TRAIN, setups=[("tt1", TITAN), ("tt2", TITAN)])}),
]


# 10. runs across nodes: the operator's rendezvous secret, and an endpoint node 0 cannot host (node 0
#     writes the run's secret first, then finds it cannot bind: it removes the secret and --out again)
INPUTS += [
    *[Bad(f"node-{rank}-secret-{name}", run("{W}/cases/pair.toml", "--nnodes", "2", "--node-rank", rank,
                                            "--rdzv-endpoint", "localhost:1"),
          ("PARITY_RDZV_SECRET", f"{len(value)} characters", "allowed: 32 to 1024 printable ASCII"),
          env={"PARITY_RDZV_SECRET": value})
      for rank in ("0", "1") for name, value in [("short", "x" * 31), ("space", "x" * 20 + " " + "x" * 20),
                                                 ("escape", "x" * 40 + "\x1b[2J"), ("non-ascii", "é" * 40)]],
    Bad("node-endpoint-not-this-host", run("{W}/cases/two.toml", "--nnodes", "2", "--node-rank", "0",
                                           "--rdzv-endpoint", "192.0.2.254:29500"),
        ("--rdzv-endpoint 192.0.2.254:29500", "cannot host the rendezvous there", "Cannot assign requested address"),
        {"cases/two.toml": case(setups=[(n, 'dp_api = "replicate"\ndp_replicate = 2') for n in ("ref", "other")])}),
]


def run_to(out: str, *args: str, baselines: str = "{W}/" + BL) -> list[str]:
    return ["run", "{W}/cases/pair.toml", "--device", "cpu", "--out", out, "--baselines", baselines, *args]


OTHER = "runs/other"  # an --out that exists and holds something
INPUTS += [
    # 11. trust boundaries: a run directory and a baseline root that overlap (a run replaces its case
    # folders: it would delete the baselines it judges by), an --out holding other work, files that
    # are not regular files (open() on a FIFO blocks forever), the environment
    Bad("out-equals-baselines", run_to("{W}/" + BL, "--update-baselines=new"), ("--out", "--baselines", "same folder")),
    Bad("out-inside-baselines", run_to("{W}/" + BL + "/runs"), ("--out", "--baselines", "inside the baseline root")),
    Bad("baselines-inside-out", run_to("{W}/runs", baselines="{W}/runs/sub/bl"),
        ("--out", "--baselines", "inside the run directory")),
    Bad("out-is-a-link-to-baselines", run_to("{W}/bl/link"), ("--out", "same folder"),
        {"bl/link": symlink_to("baselines")}),
    Bad("tool-parity-out-equals-baselines", ["run", "{W}/cases/pair.toml", "--device", "cpu"],
        ("[tool.parity] out", "[tool.parity] baselines", "same folder"),
        {"pyproject.toml": '[tool.parity]\nout = "bl/baselines"\nbaselines = "bl/baselines"\n'}),
    Bad("out-holds-a-users-report", run_to("{W}/" + OTHER), (OTHER, "'report.md'", "did not write"),
        {OTHER + "/report.md": "my own notes\n"}),
    Bad("out-holds-plan-and-html", run_to("{W}/" + OTHER), ("'plan.json'", "'report.html'"),
        {OTHER + "/plan.json": "{}\n", OTHER + "/report.html": "<p>mine</p>\n"}),
    Bad("out-marker-does-not-list-it", run_to("{W}/" + OTHER), ("'notes.txt'",),
        {OTHER + "/.parity-run": marker("report.md"), OTHER + "/notes.txt": "x\n"}),
    Bad("out-folder-without-case-mark", run_to("{W}/" + OTHER), ("'pair'", "did not write"),
        {OTHER + "/pair/ref/metrics.csv": "step,loss\n"}),
    Bad("out-marker-not-json", run_to("{W}/" + OTHER), (".parity-run", "run marker"), {OTHER + "/.parity-run": "junk"}),
    Bad("out-marker-entry-escapes", run_to("{W}/" + OTHER), (".parity-run", "run marker"),
        {OTHER + "/.parity-run": marker("../../SENTINEL")}),
    Bad("out-marker-is-a-fifo", run_to("{W}/" + OTHER), (".parity-run", "FIFO"), {OTHER + "/.parity-run": fifo}),
    Bad("case-file-is-a-fifo", run("{W}/cases/f.toml"), ("f.toml", "FIFO"), {"cases/f.toml": fifo}),
    Bad("case-dir-holds-a-fifo", run("{W}/fdir"), ("a.toml", "FIFO"), {"fdir/a.toml": fifo}),
    Bad("list-case-file-is-a-fifo", ["list", "{W}/cases/f.toml"], ("f.toml", "FIFO"), {"cases/f.toml": fifo}),
    Bad("case-file-is-dev-zero", run("{W}/cases/z.toml"), ("z.toml", "character device"),
        {"cases/z.toml": symlink_to("/dev/zero")}),
    Bad("baseline-file-is-a-fifo", run(), ("ref.cpu.csv", "FIFO"), {f"{BL}/pair/ref.cpu.csv": fifo}),
    Bad("token-file-is-a-fifo", run("{W}/cases/d.toml"), ("train.data", "tok.npy"),
        {"cases/d.toml": case(train={"data": '"tok.npy"'}), "cases/tok.npy": fifo}),
    Bad("pyproject-is-a-fifo", ["run", "{W}/cases/pair.toml", "--device", "cpu"], ("pyproject.toml", "FIFO"),
        {"pyproject.toml": fifo}),
    Bad("compare-run-json-is-a-fifo", compare(), ("run.json", "FIFO"), {f"{RUN}/pair/ref/run.json": fifo}),
    Bad("env-omp-threads-not-a-number", run(), ("PARITY_OMP_THREADS", "'abc'", "1 to 1024"),
        env={"PARITY_OMP_THREADS": "abc"}),
    Bad("env-omp-threads-zero", run(), ("PARITY_OMP_THREADS", "'0'"), env={"PARITY_OMP_THREADS": "0"}),
    Bad("env-omp-threads-huge", run(), ("PARITY_OMP_THREADS", "1 to 1024"), env={"PARITY_OMP_THREADS": "99999999"}),
]


# ----------------------------------------------------------------------------- the contract


def call_main(argv: list[str], capsys) -> tuple[int | None, str, str | None]:
    """(exit code, stderr, what was raised instead) of `parity ARGV` in process."""
    capsys.readouterr()
    raised = None
    code = None
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ReachedLaunch:
        raised = "ReachedLaunch"
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - at the command line this is a traceback (DCP's CheckpointException is a BaseException)
        raised = f"traceback {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return code, capsys.readouterr().err, raised


def workspace(tmp_path: Path, monkeypatch, files: dict, env: dict) -> Path:
    root = tmp_path / "w"
    write_files(root, base_files())
    (root / "cache").mkdir()
    write_files(root, files)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PARITY_CACHE", str(root / "cache"))
    for k, v in env.items():
        monkeypatch.setenv(k, v.replace("{W}", str(root)))
    return root


def contract_problems(bad: Bad, code, err: str, raised, events, before, after, root: Path) -> list[str]:
    problems = []
    if events:
        problems.append("; ".join(dict.fromkeys(events)))
    if raised and raised != "ReachedLaunch":
        problems.append(raised)
    elif code != 2 and not raised:
        problems.append(f"exit {code}")
    lines = err.rstrip("\n").split("\n") if err.strip() else []
    usage_form = bad.usage and code == 2 and len(lines) >= 2 and lines[0].startswith("usage:")
    if usage_form:
        last = lines[-1]
        if "error:" not in last:
            problems.append(f"usage error without an 'error:' line: {last!r}")
        missing = [e for e in bad.expect if not (e.found_in(last) if isinstance(e, Any) else e in last)]
        if missing:
            problems.append(f"error line does not name {missing}: {last!r}")
    elif not raised:
        if len(lines) != 1:
            problems.append(f"stderr has {len(lines)} lines: {err[:300]!r}")
        line = lines[0] if lines else ""
        if not line.startswith("parity: error:"):
            problems.append(f"stderr does not start with 'parity: error:': {line[:200]!r}")
        if "Traceback" in err:
            problems.append("stderr has a Traceback")
        missing = [e for e in bad.expect if not (e.found_in(line) if isinstance(e, Any) else e in line)]
        if missing and lines:
            problems.append(f"error line does not name {missing}: {line[:300]!r}")
    if (root / OUT).exists():
        problems.append(f"--out {OUT} was created")
    for s in SENTINELS:
        if before.get(s) != after.get(s):
            problems.append(f"sentinel {s} changed or gone")
    if any(os.scandir(root / "cache")) if (root / "cache").is_dir() else True:
        problems.append("the seed cache is not empty")
    beside = sorted(set(os.listdir(root.parent)) - {root.name})
    if beside:
        problems.append(f"wrote beside the workspace: {beside}")
    diff = snapshot_diff(before, after)
    if diff:
        problems.append("wrote: " + " ".join(diff))
    return problems


@pytest.mark.parametrize("bad", INPUTS, ids=[b.id for b in INPUTS])
def test_bad_input(bad: Bad, tmp_path, monkeypatch, capsys):
    root = workspace(tmp_path, monkeypatch, bad.files, bad.env)
    events = install_guards(monkeypatch, tmp_path)
    argv = [a.replace("{W}", str(root)) for a in bad.argv]
    before = snapshot(root)
    code, err, raised = call_main(argv, capsys)
    after = snapshot(root)
    problems = contract_problems(bad, code, err, raised, events, before, after, root)
    assert not problems, f"{bad.id}: " + " | ".join(problems)


def test_sweep_is_large_and_ids_are_unique():
    ids = [b.id for b in INPUTS]
    assert len(ids) == len(set(ids))
    assert len(INPUTS) >= 70


# ----------------------------------------------------------------------------- controls: the workspace itself is valid
# Each bad input is one change away from these, so a failure above is about that change.


def test_control_valid_case_files_load(tmp_path, monkeypatch, capsys):
    root = workspace(tmp_path, monkeypatch, {"cases/d.toml": case(train={"data": '"good.npy"'}),
                                             "cases/good.npy": npy(GOOD_TOKENS),
                                             "cases/long_name_" + "z" * 47 + ".toml": case()}, {})
    install_guards(monkeypatch, tmp_path)
    for name in ("pair.toml", "d.toml", "long_name_" + "z" * 47 + ".toml"):
        code, err, raised = call_main(["list", str(root / "cases" / name)], capsys)
        assert (code, err, raised) == (0, "", None), name


def test_control_valid_external_setups_load(tmp_path, monkeypatch, capsys):
    """The command and torchtitan setups the rows of section 9 change one key of."""
    root = workspace(tmp_path, monkeypatch, {
        "cases/cmd.toml": case(setups=[("ref", SETUP), ("cmd", CMD)]),
        "cases/titan.toml": case(train=TITAN_TRAIN, setups=[("tt1", TITAN), ("tt2", TITAN + "\nseed = 7")]),
        "cases/cmdref.toml": case(setups=[("cmd", CMD), ("ref", SETUP)])}, {})
    install_guards(monkeypatch, tmp_path)
    for name in ("cmd.toml", "titan.toml", "cmdref.toml"):
        code, err, raised = call_main(["list", str(root / "cases" / name)], capsys)
        assert (code, err, raised) == (0, "", None), name


def test_control_hand_written_run_passes_compare(tmp_path, monkeypatch, capsys):
    root = workspace(tmp_path, monkeypatch, {}, {})
    events = install_guards(monkeypatch, tmp_path)
    code, err, raised = call_main(["compare", str(root / RUN), str(root / "cases" / "pair.toml"),
                                   "--baselines", str(root / BL)], capsys)
    assert (code, err, raised, events) == (0, "", None, [])


def test_lint_reports_a_binary_baseline_as_a_finding(tmp_path, monkeypatch, capsys):
    """Not in the sweep: `lint`'s input is the baseline root, and a corrupt file in it is what lint exists to report.

    Reporting it as a problem line (exit 1, like a linter on a file with a syntax error) or refusing it with
    exit 2 are both fair; a traceback, silence about the file, or a write are not.
    """
    root = workspace(tmp_path, monkeypatch, {f"{BL}/pair/junk.cpu.csv": BINARY}, {})
    events = install_guards(monkeypatch, tmp_path)
    before = snapshot(root)
    capsys.readouterr()
    try:
        code = cli.main(["baselines", "lint", "--baselines", str(root / BL)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code in (1, 2), (code, out, err)
    assert "Traceback" not in out + err
    assert any("junk.cpu.csv" in line for line in (out + err).splitlines()), out + err
    assert events == [] and snapshot_diff(before, snapshot(root)) == []
