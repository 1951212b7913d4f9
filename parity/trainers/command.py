"""A setup run by its own training command (`trainer = "command"`; torchtitan is a preset of it).

The harness fills in the command's argv template, runs it with the launch's timeout, log capture
and teardown, reads back the metrics the command wrote (parity.trainers.readers, exactly where the
source carries every bit), digests its final weights, and writes the same run records a built-in
setup leaves. Compare, baselines and reports never learn where a run came from.

In a case file:

    [setups.my_script]
    trainer = "command"
    world_size = 1
    argv = ["{python}", "train.py", "--init", "{seed_checkpoint}", "--out", "{output_dir}", "--steps", "{steps}"]
    metrics = { reader = "jsonl", path = "metrics.jsonl" }
    weights = "final.pt"          # optional: a torch.save'd state dict or a DCP directory, in output_dir

The command runs in the case file's directory; `weights` and the metrics `path` are relative to
the setup's output directory, which the harness creates empty for every run.
"""

from __future__ import annotations

import importlib.util
import shutil
import string
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from parity.case.schema import SHARED_TRAIN_KEYS, TRAIN_KEYS
from parity.core import records
from parity.core.fingerprint import fingerprint
from parity.core.paths import inside
from parity.core.process import LaunchResult, process_env, run_process
from parity.trainers.base import Trainer
from parity.trainers.readers import read_metrics, reader_problems

COMMAND_KEYS = {"argv", "metrics", "weights"}
# What an argv template (or weights path) may name. The train values are the setup's, after [train]
# and its own overrides; paths are absolute.
PLACEHOLDERS = ("python", "seed_checkpoint", "output_dir", "world_size", "device", "steps", "seed",
                "global_batch", "seq_len", "lr", "warmup_steps", "max_norm", "weight_decay", "model", "dtype")
# `weights` is a path inside the output directory: no placeholder that expands to a path elsewhere.
WEIGHTS_PLACEHOLDERS = ("steps", "seed", "world_size")
# Readers that need a package parity does not depend on.
READER_PACKAGES = {"tensorboard": "tensorboard"}
OUTPUT_DIR = "output"  # the command's own folder, inside the setup's record folder
LOG_NAME = "command.log"  # its stdout and stderr


def template_problem(text, allowed=PLACEHOLDERS) -> str | None:
    """Why a template string is not usable (None if it is): only {name} fields from `allowed`."""
    if not isinstance(text, str):
        return f"{text!r} is not a string"
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as e:
        return f"{text!r}: {e}; write a literal brace as {{{{ or }}}}"
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            return f"{text!r}: unknown placeholder {{{name}{'!' + conversion if conversion else ''}" \
                   f"{':' + spec if spec else ''}}}; allowed: {', '.join('{' + p + '}' for p in allowed)}"
    return None


def relative_path_problem(text) -> str | None:
    """A path inside the output directory: relative, no `..` (a hostile case must not read elsewhere)."""
    if not isinstance(text, str) or not text:
        return f"{text!r} is not allowed; allowed: a relative path inside the setup's output directory"
    if PurePosixPath(text).is_absolute() or ".." in PurePosixPath(text).parts:
        return f"{text!r} leaves the setup's output directory; allowed: a relative path without '..'"
    return None


def setup_problems(body: dict, case_dir: Path) -> list[tuple[str, str]]:
    """(key, message) for each thing wrong with a command setup's own keys."""
    argv = body.get("argv")
    if not isinstance(argv, list) or not argv:
        got = "required" if argv is None else f"{argv!r} is not allowed"
        return [("argv", f"{got}; allowed: a non-empty list of strings, e.g. [\"{{python}}\", \"train.py\", "
                 "\"--steps\", \"{steps}\"]")]
    for i, arg in enumerate(argv):
        if (problem := template_problem(arg)) is not None:
            return [(f"argv[{i}]", problem)]
    if "metrics" not in body:
        return [("metrics", "required: how to read the command's metrics, e.g. { reader = \"jsonl\", "
                 "path = \"metrics.jsonl\" }; readers: tensorboard, jsonl, regex")]
    if not isinstance(body["metrics"], dict):
        return [("metrics", f"must be a table, got {body['metrics']!r}")]
    problems = list(reader_problems(body["metrics"]))  # keys already read metrics.KEY
    weights = body.get("weights")
    if weights is not None:
        problem = template_problem(weights, WEIGHTS_PLACEHOLDERS) or relative_path_problem(weights)
        if problem is not None:
            problems.append(("weights", problem))
    return problems


def normalize(body: dict, case_dir: Path) -> dict:
    """The validated keys as the runner uses them: the command runs in the case file's directory."""
    return {"argv": list(body["argv"]), "metrics": dict(body["metrics"]), "weights": body.get("weights"),
            "cwd": str(Path(case_dir).resolve()), "env": {}}


def placeholder_values(setup, device: str, seed_checkpoint: str, output_dir: Path) -> dict[str, str]:
    t = setup.train
    return {"python": sys.executable, "seed_checkpoint": str(seed_checkpoint), "output_dir": str(output_dir),
            "world_size": str(setup.world_size), "device": device, "steps": str(t.steps), "seed": str(t.seed),
            "global_batch": str(t.global_batch), "seq_len": str(t.seq_len), "lr": repr(t.lr),
            "warmup_steps": str(t.warmup_steps), "max_norm": repr(t.max_norm), "weight_decay": repr(t.weight_decay),
            "model": t.model, "dtype": t.dtype}


def run_setup(command: dict, setup, case_name: str, out: Path, device: str, seed_checkpoint: str,
              provenance: dict, timeout_s: float, gpus: list[str] | None = None,
              extra_info: dict | None = None):
    """Run one external setup and write its records; returns how it ended.

    `command` is a setup's validated keys (normalize) or a preset's expansion of them. A command
    that exits 0 but leaves metrics that cannot be read is a failed run, with the reason.
    Returns a parity.core.process.LaunchResult.
    """
    setup_dir = records.setup_dir(out, case_name, setup.name)
    output_dir = setup_dir / OUTPUT_DIR
    output_dir.mkdir(parents=True)
    values = placeholder_values(setup, device, seed_checkpoint, output_dir)
    argv = [arg.format_map(values) for arg in command["argv"]]
    log = setup_dir / LOG_NAME
    started = datetime.now(timezone.utc).isoformat()
    result = run_process(argv, process_env(gpus, command.get("env")), log, timeout_s, cwd=command["cwd"],
                         label=f"setup {setup.name}'s command")
    if result.status != "ok":
        return result
    try:
        read = read_metrics(command["metrics"], output_dir, log, setup.train.steps, budget_s=timeout_s)
        weights = None
        if command.get("weights"):
            weights = digest_weights(inside(output_dir, *Path(command["weights"].format_map(values)).parts))
    except records.RecordError as e:
        return LaunchResult("failed", 0, f"the command exited 0 but its records cannot be read: {e}", result.wall_s)
    for rel in command.get("discard", ()):  # read and digested: large files the records do not need
        shutil.rmtree(inside(output_dir, *Path(rel).parts), ignore_errors=True)
    records.write_metrics(setup_dir / "metrics.csv", read.rows)
    if weights is not None:
        records.write_weights(setup_dir / "weights.csv", weights)
    fp = fingerprint(device_for(device))
    records.write_json(setup_dir / "run.json", {
        **provenance, "case": case_name, "setup": setup.name, "status": "ok", "trainer": setup.trainer,
        "device": fp.get("gpu", "cpu"), "platform": fp["platform"], "backend": "nccl" if device == "cuda" else "gloo",
        "fingerprint": fp, "world_size": setup.world_size, "argv": argv, "cwd": command["cwd"],
        "metrics_source": read.source, "rounded": read.rounded, "weights_recorded": weights is not None,
        "train": setup.to_dict()["train"], **(extra_info or {}), "wall_s": result.wall_s,
        "started": started, "ended": datetime.now(timezone.utc).isoformat()})
    return result


def device_for(device: str):
    import torch

    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


def digest_weights(path: Path) -> list[dict]:
    """weights.csv rows from the final weights a command left: a DCP directory or a torch.save'd state dict."""
    # torch loads here, where weights are read, not for every command that loads the trainer registry.
    import torch

    from parity.rank.sketch import state_dict_digest

    if (path / ".metadata").is_file():
        state = load_dcp_full(path)
    elif path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle code runs
        except Exception as e:  # torch raises many types for a file that is not a state dict
            raise records.RecordError(f"{path}: not a torch.save'd state dict ({type(e).__name__}: {e})") from None
    else:
        raise records.RecordError(f"{path}: no final weights here (neither a file nor a DCP directory)")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise records.RecordError(f"{path}: expected a state dict of tensors (name -> tensor)")
    return state_dict_digest({k: v for k, v in state.items() if v.is_floating_point()})


def load_dcp_full(path: Path) -> dict:
    """Every tensor of a DCP checkpoint, whole, in this one process (no process group); other entries
    (a full training checkpoint's step counters, say) are left out."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    try:
        meta = reader.read_metadata()
    except Exception as e:  # pickle and DCP raise many types for a damaged file; all mean the same here
        raise records.RecordError(f"{path}: not a readable DCP checkpoint ({type(e).__name__}: {e})") from None
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


class CommandTrainer(Trainer):
    """`trainer = "command"`: each setup runs its own argv template; its metrics are read back (parity.trainers.readers)."""

    name = "command"
    keys = frozenset(COMMAND_KEYS)
    train_keys = frozenset(TRAIN_KEYS - set(SHARED_TRAIN_KEYS))
    marker = "case runs a setup through its own training command (trainer = \"command\")"

    def setup_problems(self, body: dict, case_dir: Path) -> list[tuple[str, str]]:
        return setup_problems(body, case_dir)

    def normalize(self, body: dict, case_dir: Path) -> dict:
        return normalize(body, case_dir)

    def missing(self, case) -> str | None:
        """Why this machine cannot read the metrics of the case's setups of this trainer (None if it can), found
        before anything runs rather than after the training whose records it would read."""
        for s in case.setups:
            if s.trainer != self.name:
                continue
            reader = s.external["metrics"]["reader"]
            package = READER_PACKAGES.get(reader)
            if package and importlib.util.find_spec(package) is None:
                return (f"setups.{s.name}.metrics: the {reader} reader needs the {package} package, which is not "
                        f"installed; install with: pip install {package}")
        return None

    def prepare(self, case, setup, device: str, cache: Path | None, timeout_s: float, workdir: Path,
                seed_checkpoint: str) -> tuple[dict, str, dict]:
        """The setup's own validated keys are its command; it loads the case's seed checkpoint."""
        return setup.external, seed_checkpoint, {}

    def run_setup(self, command: dict, setup, case_name: str, out: Path, device: str, seed_checkpoint: str,
                  provenance: dict, timeout_s: float, gpus: list[str] | None = None, extra_info: dict | None = None):
        return run_setup(command, setup, case_name, out, device, seed_checkpoint, provenance, timeout_s, gpus,
                         extra_info)


TRAINER = CommandTrainer()
