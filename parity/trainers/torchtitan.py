"""torchtitan as a setup: a preset of `trainer = "command"` that runs torchtitan's own trainer.

    [setups.replicate_2]
    trainer = "torchtitan"
    module = "llama3"                 # torchtitan --module
    config = "llama3_debugmodel"      # torchtitan --config
    world_size = 2
    args = ["--parallelism.data-parallel-replicate-degree=2", "--parallelism.data-parallel-shard-degree=1"]
    # source = "PATH"                 # a torchtitan source tree to import instead of the installed package
    # ref = "GIT-REF"                 # with source: that commit of it (extracted with git archive)

The preset owns what makes setups comparable: one seed checkpoint made by torchtitan itself at
world size 1 (cached by torchtitan version, commit or tree hash, module, config, seed and device)
and loaded by every setup; the same seed, steps and (where [train] gives them) batch and sequence
sizes as flags; the same locally made tokenizer and dataset; TensorBoard scalars at every step,
read back as exact float32 values; a final model-only checkpoint, digested like a built-in setup's
weights.
On CPU the ranks start through parity.trainers.titan_cpu; on CUDA through torchtitan.train itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

from parity.case.trainer import BUILTIN
from parity.core.files import open_regular
from parity.core.process import process_env, run_process
from parity.trainers.command import CommandTrainer, load_dcp_full
from parity.trainers.seed_cache import SeedBuildError, cached_build, deterministic_writer
from parity.trainers.titan_assets import asset_args, write_assets

TITAN_KEYS = {"module", "config", "args", "source", "ref"}
DEFAULT_MODULE, DEFAULT_CONFIG = "llama3", "llama3_debugmodel"
# The [train] keys that mean the same in torchtitan. steps and seed are always passed; the batch
# and sequence sizes only where the case's [train] gives them (else torchtitan's config decides).
TITAN_TRAIN_FLAGS = {"steps": "--training.steps", "seed": "--debug.seed",
                     "global_batch": "--training.global-batch-size", "seq_len": "--training.seq-len"}
ALWAYS_PASSED = ("steps", "seed")
# Flags the harness sets for every setup; a setup's args may not set them, or the comparison's
# shared seed checkpoint, data, step count and records would be the setup's own.
OWNED = ("--module", "--config", "--dump-folder", "--hf-assets-path", "--dataloader.dataset-path",
         "--dataloader.dataset", "--checkpoint.", "--metrics.", "--debug.seed", "--debug.deterministic",
         "--training.steps", "--validator.")
INSTALL = 'pip install "parity[torchtitan]"'
NO_INTERIM_SAVE = 10**9  # a checkpoint interval no run reaches
TB_TAGS = {"loss": "loss_metrics/global_avg_loss", "grad_norm": "grad_norm", "lr": "lr/AdamW", "tokens": "n_tokens_seen"}
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./~^@{}-]*")  # no leading '-': a ref is never read as a git option


def flag_name(arg: str) -> str:
    """`--a.b_c=1` -> `--a.b-c`: tyro takes dashes and underscores alike."""
    return arg.split("=", 1)[0].replace("_", "-")


def setup_problems(body: dict, case_dir: Path) -> list[tuple[str, str]]:
    """(key, message) for each thing wrong with a torchtitan setup's own keys."""
    for key in ("module", "config"):
        value = body.get(key, DEFAULT_MODULE if key == "module" else DEFAULT_CONFIG)
        if not isinstance(value, str) or not _MODULE_NAME.fullmatch(value):
            return [(key, f"{value!r} is not allowed; allowed: a Python module or function name such as "
                     f"{DEFAULT_MODULE if key == 'module' else DEFAULT_CONFIG!r}")]
    args = body.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return [("args", f"{args!r} is not allowed; allowed: a list of torchtitan flags as strings")]
    for i, arg in enumerate(args):
        name = flag_name(arg)
        if any(name == o or (o.endswith(".") and name.startswith(o)) for o in OWNED):
            return [(f"args[{i}]", f"{arg!r}: the harness sets {name} for every setup of the case; allowed: other "
                     "torchtitan flags (steps, seed and sizes come from [train])")]
    source, ref = body.get("source"), body.get("ref")
    if ref is not None and source is None:
        return [("ref", "needs source: the torchtitan git tree to take the ref from")]
    if source is None:
        return []
    if not isinstance(source, str):
        return [("source", f"{source!r} is not allowed; allowed: a path to a torchtitan source tree")]
    tree = (Path(case_dir) / source).resolve()
    if not (tree / "torchtitan" / "__init__.py").is_file() and ref is None:
        return [("source", f"{tree} holds no torchtitan/__init__.py; allowed: a torchtitan source tree (its top folder)")]
    if ref is None:
        return []
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        return [("ref", f"{ref!r} is not allowed; allowed: a git branch, tag or commit")]
    if resolve_ref(tree, ref) is None:
        return [("ref", f"{ref!r} is not a commit of the git tree {tree}")]
    return []


def normalize(body: dict, case_dir: Path) -> dict:
    source = body.get("source")
    return {"module": body.get("module", DEFAULT_MODULE), "config": body.get("config", DEFAULT_CONFIG),
            "args": list(body.get("args", [])), "source": str((Path(case_dir) / source).resolve()) if source else None,
            "ref": body.get("ref"), "train_flags": list(ALWAYS_PASSED)}


def resolve_ref(tree: Path, ref: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--verify", "--quiet", "--end-of-options",
                              f"{ref}^{{commit}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def missing(case) -> str | None:
    """Why this machine cannot run the case's torchtitan setups (None if it can): the skip reason."""
    if not any(s.trainer == "torchtitan" for s in case.setups):
        return None
    needs = ["tensorboard", "tyro", "tokenizers"]
    if any(s.external["source"] is None for s in case.setups if s.trainer == "torchtitan"):
        needs.insert(0, "torchtitan")
    absent = [m for m in needs if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed; install with: {INSTALL}" if absent else None


def identity(setup) -> dict:
    """Which torchtitan a setup runs: the installed version, a source tree's commit (with ref), or the
    files of a source tree as they are (without ref: its tree hash, with the commit they started from)."""
    ext = setup.external
    if ext["source"] is None:
        return {"torchtitan": importlib.metadata.version("torchtitan")}
    if ext["ref"] is not None:
        return {"torchtitan_source": ext["source"], "torchtitan_ref": ext["ref"],
                "torchtitan_commit": resolve_ref(Path(ext["source"]), ext["ref"])}
    head = resolve_ref(Path(ext["source"]), "HEAD")
    dirty = head and subprocess.run(["git", "-C", ext["source"], "status", "--porcelain"],
                                    capture_output=True, text=True, timeout=30).stdout.strip()
    return {"torchtitan_source": ext["source"],
            "torchtitan_commit": (head + ("-dirty" if dirty else "")) if head else "not a git tree",
            "torchtitan_tree_sha256": tree_sha256(Path(ext["source"]))}


def tree_sha256(tree: Path) -> str:
    """The code of a source tree as it is now: sha256 over each file's path, kind and content.

    A commit names a tree's files only while nothing is edited; this sees every edit, an untracked
    file (a new module) included, so a seed built from other code is never reused for it.
    """
    h = hashlib.sha256()
    for rel in _tree_files(tree):
        if (entry := _file_entry(tree / rel)) is not None:
            h.update(f"{rel}\0{entry}\0".encode(errors="surrogateescape"))
    return h.hexdigest()


def _tree_files(tree: Path) -> list[str]:
    """A git tree's tracked and untracked files that .gitignore leaves in; any other tree's files but
    .git, __pycache__ and *.pyc (as if nothing were ignored: more files, never fewer)."""
    try:
        out = subprocess.run(["git", "-C", str(tree), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, timeout=60)
        listed = {os.fsdecode(p) for p in out.stdout.split(b"\0") if p} if out.returncode == 0 else set()
    except (OSError, subprocess.SubprocessError):  # no git: walk
        listed = set()
    # Nothing listed: not a git tree, or one whose .gitignore leaves out this whole folder.
    return sorted(listed or _walk(tree))


def _walk(tree: Path):
    for root, dirs, names in os.walk(tree):  # links to folders are not followed: they are hashed as links
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__")]
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in names + links:
            if not name.endswith(".pyc"):
                yield os.path.relpath(os.path.join(root, name), tree)


def _file_entry(path: Path) -> str | None:
    """One file's part of a tree hash: its kind and content; a link's target string, never followed
    (a link may lead out of the tree); a nested repository (a submodule) by its own tree hash."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return "link\0" + os.readlink(path)
        if stat.S_ISDIR(st.st_mode):
            return "tree\0" + tree_sha256(path)
        if not stat.S_ISREG(st.st_mode):
            return "special"  # a FIFO or device: never opened, Python cannot import it either
        with open_regular(path, follow_symlinks=False) as f:
            kind = "executable" if st.st_mode & 0o111 else "file"  # the one mode bit git keeps
            return f"{kind}\0" + hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None  # a tracked file deleted from the working tree: not part of the code that runs
    except OSError as e:  # unreadable: the run (the same user) cannot read it either
        return f"unreadable\0{e.strerror or e}"


def source_tree(setup, workdir: Path) -> Path | None:
    """The folder to put first on PYTHONPATH: None (installed package), the source tree, or its ref's files."""
    ext = setup.external
    if ext["source"] is None:
        return None
    if ext["ref"] is None:
        return Path(ext["source"])
    commit = resolve_ref(Path(ext["source"]), ext["ref"])
    tree = Path(workdir) / f"torchtitan-{commit}"
    if not tree.is_dir():
        # git archive reads the commit's files without touching the user's repository (no worktree entry).
        tar = subprocess.run(["git", "-C", ext["source"], "archive", "--format=tar", commit],
                             capture_output=True, timeout=300, check=True).stdout
        tmp = Path(tempfile.mkdtemp(dir=workdir, prefix=".tree-"))
        with tarfile.open(fileobj=io.BytesIO(tar)) as f:
            f.extractall(tmp, filter="data")  # refuses absolute paths, '..' and links out of the tree
        tmp.rename(tree)
    return tree


def _env(tree: Path | None) -> dict:
    """Offline datasets (the assets are local files), and the source tree first on the import path."""
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if tree is not None:
        rest = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = str(tree) + (os.pathsep + rest if rest else "")
    return env


def _entry(device: str) -> str:
    return "parity.trainers.titan_cpu" if device == "cpu" else "torchtitan.train"


def _torchrun(device: str) -> list[str]:
    return ["{python}", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node={world_size}",
            "-m", _entry(device)]


def _model_flags(ext: dict) -> list[str]:
    return ["--module", ext["module"], "--config", ext["config"]]


def _common_flags(assets: Path, device: str, deterministic: bool) -> list[str]:
    # CUDA graphs do not support pipeline parallelism; eager everywhere keeps setups alike.
    flags = [*asset_args(assets), "--validator.no-enable", "--metrics.disable-color-printing",
             "--training.disable-cuda-graphs"]
    if device == "cuda" and deterministic:
        flags.append("--debug.deterministic")
    return flags


def _train_flags(setup) -> list[str]:
    keys = setup.external["train_flags"]
    return [f"{TITAN_TRAIN_FLAGS[k]}={{{k}}}" for k in TITAN_TRAIN_FLAGS if k in keys]  # filled in per run


def command_for(setup, device: str, assets: Path, tree: Path | None, deterministic: bool) -> dict:
    """The setup as a command (parity.trainers.command): torchrun over torchtitan, flags, readers, weights."""
    ext = setup.external
    flags = [*_model_flags(ext), *_common_flags(assets, device, deterministic), *_train_flags(setup),
             "--dump-folder", "{output_dir}",
             "--metrics.enable-tensorboard", "--metrics.save-tb-folder", "tb", "--metrics.log-freq=1",
             # The seed's model weights in; the final model weights out at the last step (always
             # saved), and nothing in between. --checkpoint.load-only would stop that last save.
             "--checkpoint.enable", "--checkpoint.folder", "checkpoint",
             "--checkpoint.initial-load-path", "{seed_checkpoint}", "--checkpoint.initial-load-model-only",
             "--checkpoint.last-save-model-only", f"--checkpoint.interval={NO_INTERIM_SAVE}",
             *ext["args"]]
    return {"argv": [*_torchrun(device), *flags],
            "metrics": {"reader": "tensorboard", "path": "tb", **TB_TAGS},
            "weights": "checkpoint/step-{steps}", "discard": ["checkpoint"], "cwd": str(assets), "env": _env(tree)}


def seed_key(setup, device: str, assets_sha: str) -> str:
    ext = setup.external
    doc = {"identity": identity(setup), "module": ext["module"], "config": ext["config"], "seed": setup.train.seed,
           "device": device, "assets": assets_sha,
           "args": [a for a in ext["args"] if not flag_name(a).startswith("--parallelism.")]}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    return f"torchtitan-{ext['config']}-seed{setup.train.seed}-{device}-{digest}"


def seed_argv(setup, device: str, assets: Path, dump: Path, deterministic: bool) -> list[str]:
    """torchtitan at world size 1 writing its own seed checkpoint (`--checkpoint.create-seed-checkpoint`)."""
    ext = setup.external
    keep = [a for a in ext["args"] if not flag_name(a).startswith("--parallelism.")]  # degrees must be 1 here
    flags = [*_model_flags(ext), *_common_flags(assets, device, deterministic), f"--debug.seed={setup.train.seed}",
             "--dump-folder", str(dump), "--checkpoint.enable", "--checkpoint.create-seed-checkpoint",
             "--checkpoint.folder", "checkpoint", "--checkpoint.last-save-model-only", *keep]
    launcher = [a.format_map({"python": sys.executable, "world_size": "1"}) for a in _torchrun(device)]
    return [*launcher, *flags]


def write_seed(setup, device: str, assets: Path, tree: Path | None, dest: Path, timeout_s: float,
               deterministic: bool) -> None:
    """Run torchtitan's seed-checkpoint build into a scratch folder, then save its model weights into dest.

    torchtitan's `.metadata` pickles the save path and a random save id, so two builds of the same
    weights differ in bytes. Re-saving the same tensors with parity's deterministic writer keeps a
    rebuilt cache entry's hash, and so every baseline's seed_checkpoint_sha256, stable.
    """
    import torch.distributed.checkpoint as dcp

    scratch = Path(tempfile.mkdtemp(prefix="parity-titan-seed-"))
    try:
        log = scratch / "seed.log"
        result = run_process(seed_argv(setup, device, assets, scratch / "dump", deterministic),
                             process_env(None, _env(tree)), log, timeout_s, cwd=assets,
                             label="torchtitan's seed checkpoint build")
        step0 = scratch / "dump" / "checkpoint" / "step-0"
        if result.status != "ok" or not (step0 / ".metadata").is_file():
            raise SeedBuildError(f"torchtitan could not build the seed checkpoint for setup {setup.name}: "
                                 f"{result.message or 'no checkpoint/step-0 written'}")
        state = load_dcp_full(step0)
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=deterministic_writer(str(dest)), no_dist=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def seed_checkpoint(case, device: str, cache: Path | None, timeout_s: float, seed: int | None = None):
    """The case's torchtitan seed checkpoint (parity.trainers.seed_cache.SeedInfo), from the cache or built now by the
    first torchtitan setup's torchtitan at world size 1. Raises SeedBuildError if torchtitan fails.

    `seed`: for a setup that overrides the case's seed. torchtitan's seed only draws the initial
    weights (its data order is fixed), so such a setup starts from that seed's checkpoint instead.
    """
    ref = next(s for s in case.setups if s.trainer == "torchtitan")
    if seed is not None:
        ref = replace(ref, train=replace(ref.train, seed=seed))
    deterministic = case.determinism["deterministic_algorithms"]
    with tempfile.TemporaryDirectory(prefix="parity-titan-") as work:
        assets = Path(work) / "assets"
        key = seed_key(ref, device, write_assets(assets))
        tree = source_tree(ref, Path(work))
        what = f"seed cache: torchtitan {ref.external['module']} {ref.external['config']} seed {ref.train.seed} {device}"
        return cached_build(cache, key, what,
                            lambda dest: write_seed(ref, device, assets, tree, dest, timeout_s, deterministic))


def prepare(case, setup, device: str, cache: Path | None, timeout_s: float, workdir: Path, case_ckpt: str):
    """(command, seed checkpoint path, run.json fields) for one torchtitan setup of a case being run.

    The assets are written into the run's scratch folder (the same bytes for every setup); a setup
    that overrides the case's seed gets its own seed checkpoint (see seed_checkpoint).
    """
    assets = Path(workdir) / "titan-assets"
    extra = {"titan_assets_sha256": write_assets(assets), **identity(setup), "module": setup.external["module"],
             "config": setup.external["config"]}
    ckpt = case_ckpt
    if setup.train.seed != case.reference.train.seed and case.seed_checkpoint is None:
        own = seed_checkpoint(case, device, cache, timeout_s, seed=setup.train.seed)
        ckpt = str(own.path)
        extra.update(seed_checkpoint=ckpt, seed_checkpoint_sha256=own.sha256)
    command = command_for(setup, device, assets, source_tree(setup, workdir), case.determinism["deterministic_algorithms"])
    return command, ckpt, extra


CASE_TRAIN_KEYS = tuple(TITAN_TRAIN_FLAGS)  # the [train] keys a torchtitan setup passes as its own flags


def case_problems(setups, train_given: set[str]) -> list[tuple[str, str]]:
    """What a case may mix: torchtitan trains its own model on its own data, so it is compared only with
    torchtitan (or a command that says it trains the same); every torchtitan setup loads one seed checkpoint;
    [train] keys no setup uses, and args that set what [train] sets, are mistakes."""
    titan = [s for s in setups if s.trainer == TRAINER.name]
    if not titan:
        return []
    builtin = [s for s in setups if s.trainer == BUILTIN]
    if builtin:
        return [(f"setups.{titan[0].name}.trainer", f"a torchtitan setup (torchtitan's model and data) cannot be "
                 f"compared with built-in setup {builtin[0].name} (parity's model and data); allowed: "
                 "torchtitan and command setups together, or built-in and command setups together")]
    return _one_model(titan) + _unused_train_keys(titan, setups, train_given) + _args_owned_by_train(titan, train_given)


def _one_model(titan) -> list[tuple[str, str]]:
    first = titan[0]
    return [(f"setups.{s.name}.{key}", f"{s.external[key]!r} differs from {first.name}'s {first.external[key]!r}: "
             "every setup of a case loads one seed checkpoint, made from the first torchtitan setup's model")
            for s in titan[1:] for key in ("module", "config") if s.external[key] != first.external[key]]


def _unused_train_keys(titan, setups, train_given: set[str]) -> list[tuple[str, str]]:
    unused = sorted(train_given - set(CASE_TRAIN_KEYS))
    if len(titan) != len(setups) or not unused:
        return []
    return [(f"train.{unused[0]}", "no setup of this case uses it: torchtitan setups take "
             f"{', '.join(CASE_TRAIN_KEYS)} from [train] and the rest from their config or args")]


def case_train_flags(train_given: set[str]) -> list[str]:
    """The [train] keys every torchtitan setup of the case passes as flags: steps and seed, and the sizes given."""
    return [k for k in CASE_TRAIN_KEYS if k in ALWAYS_PASSED or k in train_given]


def _args_owned_by_train(titan, train_given: set[str]) -> list[tuple[str, str]]:
    flags = case_train_flags(train_given)
    problems = []
    for s in titan:
        for i, arg in enumerate(s.external["args"]):
            key = next((k for k in flags if flag_name(arg) == TITAN_TRAIN_FLAGS[k]), None)
            if key is not None:
                problems.append((f"setups.{s.name}.args[{i}]", f"{arg!r} sets what [train] {key} sets for every "
                                 f"setup; allowed: drop it, or drop {key} from [train]"))
    return problems


class TorchtitanTrainer(CommandTrainer):
    """`trainer = "torchtitan"`: a preset of the command trainer that runs torchtitan's own trainer."""

    name = "torchtitan"
    keys = frozenset(TITAN_KEYS)
    train_keys = frozenset({"seed"})  # the one a torchtitan setup may override (a planted bug, say)
    train_keys_from = "its config or args (e.g. --optimizer.lr)"
    record_fields = ("torchtitan", "torchtitan_commit", "module", "config")
    marker = "case runs torchtitan's own trainer (needs the torchtitan extra: pip install \"parity[torchtitan]\")"
    own_model = True

    def setup_problems(self, body: dict, case_dir: Path) -> list[tuple[str, str]]:
        return setup_problems(body, case_dir)

    def normalize(self, body: dict, case_dir: Path) -> dict:
        return normalize(body, case_dir)

    def case_problems(self, setups, train_given: set[str]) -> list[tuple[str, str]]:
        return case_problems(setups, train_given)

    def finish(self, setups, train_given: set[str]):
        """Each torchtitan setup with the [train] keys it passes as flags."""
        flags = case_train_flags(train_given)
        return tuple(replace(s, external={**s.external, "train_flags": flags}) if s.trainer == self.name else s
                     for s in setups)

    def missing(self, case) -> str | None:
        return missing(case)

    def seed_checkpoint(self, case, device: str, cache: Path | None, timeout_s: float):
        return seed_checkpoint(case, device, cache, timeout_s)

    def prepare(self, case, setup, device: str, cache: Path | None, timeout_s: float, workdir: Path,
                seed_checkpoint: str) -> tuple[dict, str, dict]:
        return prepare(case, setup, device, cache, timeout_s, workdir, seed_checkpoint)


TRAINER = TorchtitanTrainer()
