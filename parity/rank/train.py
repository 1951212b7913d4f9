"""Per-rank work, entered through parity.rank: `python -m torch.distributed.run ... -m parity.rank PLAN.json`.

For each setup in the plan (all share this launch's world size), one after another: fresh mesh
and model, seed checkpoint loaded, N training steps, metrics, a weight digest and the logical
probes (parity.rank.probes) written by rank 0. This module records numbers; it never decides pass or fail.

Nothing in the step loop waits for the device: each step's loss and grad norm stay on it (as
tensors) and step times are device events, so the host queues steps ahead as a bare training
loop would. Everything is copied to the host once, after the last step, and then turned into
exactly the floats that were always recorded (NaN and Inf included, which the comparison fails).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from parity.case.schema import Setup, Train
from parity.core import fingerprint, records
from parity.core.determinism import apply_determinism
from parity.core.lifeline import ERROR_MARK
from parity.rank import memory
from parity.rank.build import build_parallel
from parity.rank.data import Batches
from parity.rank.digest import weight_digest
from parity.rank.faults import PlantedFault
from parity.rank.parallelize import Parallel
from parity.rank.probes import ProbeRecorder
from parity.rank.step import clip_grads, forward_backward, grad_norm, make_optimizer, sdpa_context, to_device

# The process group's own timeout fires this long after the launcher's: a hung collective is
# reported by the launcher, with every rank's log tail, not as a bare watchdog abort.
PG_TIMEOUT_MARGIN_S = 120.0
# The launcher polls the progress file 4 times a second. Writing it (a write and a rename) every
# step is host work inside the step that a small model on a GPU feels; twice a second is enough.
PROGRESS_EVERY_S = 0.5


def redirect_output(path: Path):
    """Send this rank's stdout/stderr (Python and C++ alike) to its own log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # the umask decides who may read it
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def setup_from_dict(d: dict) -> Setup:
    """A plan job's setup, as Setup.to_dict wrote it."""
    d = dict(d)
    return Setup(train=Train(**d.pop("train")), **d)


class StepClock:
    """Step boundaries: CUDA events on the current stream (no host sync), else the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Time between consecutive marks (waits for the last one)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def global_losses(par: Parallel, local: list[float | None]) -> list[float]:
    """Per step: the mean over data-parallel ranks of their local mean losses, summed in float64 in dp-rank order."""
    holder = local[0] is not None and par.tp_rank == 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (par.dp_rank, local if holder else None))  # once per run, not per step
    by_rank = {r: v for r, v in gathered if v is not None}
    return [math.fsum(by_rank[r][i] for r in sorted(by_rank)) / len(by_rank) for i in range(len(local))]


class Training:
    """One setup's training on this rank: its model loaded, optimizer, batches and planted fault
    (parity.rank.faults) at construction, then every step queued on the device by run."""

    def __init__(self, setup: Setup, job: dict, device: torch.device, timings: dict):
        t = self.train = setup.train
        self.setup, self.job, self.device = setup, job, device
        self.fault = PlantedFault(setup)
        self.model, self.par = build_parallel(setup, job["seed_checkpoint"], device, timings)
        self.fault.after_build(self.par)  # before the probes' hooks, which must see a scaled output
        # No recorder, no hooks: a run without probes computes exactly what it always did.
        self.probes = (ProbeRecorder(self.model, self.par, t.model_config, t.global_batch, t.seq_len,
                                     job["probe_steps"], device) if job["probe_steps"] else None)
        params = [p for m in self.par.modules for p in m.parameters()]
        self.opt = make_optimizer(params, t)
        self.batches = Batches(t.seed, t.global_batch, t.seq_len, t.model_config.vocab_size, t.data)
        self.dp_rank = self.fault.data_rank(self.par)
        self.clock = StepClock(device)
        self.micro_losses, self.norms, self.lrs = [], [], []

    def set_lr(self, step: int) -> float:
        t = self.train
        lr = t.lr * min(1.0, step / max(t.warmup_steps, 1))  # linear warmup; step 1 already trains
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, step: int) -> None:
        """Forward and backward, grad norm, clip, optimizer step; the loss and norm recorded on the device."""
        setup, par, probes = self.setup, self.par, self.probes
        self.fault.before_step(step)
        self.clock.mark()
        probing = probes is not None and probes.start(step)
        lr = self.set_lr(step)
        inputs, labels = (to_device(a, self.device) for a in self.batches.local(step, setup.dp_degree, self.dp_rank))
        with sdpa_context(self.train.attention):
            losses = forward_backward(par, setup, inputs, labels)
        self.fault.after_backward(par, step)
        if probing:
            probes.record_grads()
        total, stage = grad_norm(par, self.device)
        clip_grads(par, self.train.max_norm, self.fault.clip_norm(total, stage))
        if probing:
            probes.before_update()
        self.opt.step()
        if probing:
            probes.after_update(step)
        self.opt.zero_grad(set_to_none=True)
        self.micro_losses.append(losses)
        self.norms.append(total.detach().clone())  # stays on the device; read once after the last step
        self.lrs.append(lr)

    def run(self) -> list[float]:
        """Every step, then each step's time (the one wait for the device)."""
        steps, last_progress = self.train.steps, -math.inf
        for step in range(1, steps + 1):
            self.train_step(step)
            if dist.get_rank() == 0 and (step == steps or time.monotonic() - last_progress >= PROGRESS_EVERY_S):
                # Steps queued: the device may still be working on them.
                write_progress(self.job, self.setup, step, steps)
                last_progress = time.monotonic()
        self.clock.mark()
        return self.clock.seconds()

    def metrics_rows(self, times: list[float]) -> list[dict]:
        """metrics.csv's rows. The one copy to the host: .tolist() yields the same doubles .item() did, step by step."""
        t = self.train
        norm_values = torch.stack(self.norms).tolist()
        local = [None if ls is None else math.fsum(torch.stack(ls).tolist()) / self.setup.microbatches
                 for ls in self.micro_losses]
        losses = global_losses(self.par, local)
        return [{"step": i + 1, "loss": losses[i], "grad_norm": norm_values[i], "lr": self.lrs[i],
                 "tokens": t.global_batch * t.seq_len, "step_time_s": times[i]} for i in range(t.steps)]


def train_setup(setup: Setup, job: dict, device: torch.device) -> dict:
    """Build, train and digest one setup: its metrics rows, weight digest, probe rows, timings and peak memory."""
    timings: dict[str, float] = {}
    began = time.perf_counter()
    memory.reset_peak(device)  # after the previous setup in this process has been let go
    training = Training(setup, job, device, timings)
    # The meta model, probes and optimizer: what build_parallel's own two parts leave.
    timings["build_s"] = time.perf_counter() - began - timings["seed_load_s"] - timings["parallelize_s"]
    began = time.perf_counter()
    times = training.run()
    timings["steps_s"] = time.perf_counter() - began
    rows = training.metrics_rows(times)
    probe_rows = training.probes.rows() if training.probes is not None else None
    if dist.get_rank() == 0:
        for r in rows:
            print(f"step {r['step']}: loss {r['loss']!r} grad_norm {r['grad_norm']!r} lr {r['lr']!r} "
                  f"time {r['step_time_s']:.4f}s", flush=True)
    training.fault.after_training(training.par)
    began = time.perf_counter()
    digest = weight_digest(training.par)
    timings["digest_s"] = time.perf_counter() - began
    return {"rows": rows, "digest": digest, "par": training.par, "probes": probe_rows, "timings": timings,
            "peak_memory": peak_memory(device)}


def peak_memory(device: torch.device) -> dict | None:
    """run.json's peak_memory: every rank's peak since the setup's start (one all_gather_object)."""
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, memory.peak_bytes(device))
    if None in per_rank:
        return None
    return {"measure": memory.measure(device), "per_rank_bytes": per_rank, "max_bytes": max(per_rank)}


def write_progress(job: dict, setup: Setup, step: int, total: int):
    """The launch's one-line progress file: the launcher draws it, and restarts a setup's timeout when it names a new one."""
    path = Path(job["progress"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"case": job["case"], "setup": setup.name, "step": step, "steps": total}))
    os.replace(tmp, path)


def write_outputs(setup: Setup, job: dict, result: dict, started: str, device: torch.device, determinism: dict,
                  timings: dict):
    """Rank 0's records of one setup: metrics.csv, weights.csv, probes.csv (when probed) and run.json."""
    par = result["par"]
    out = records.setup_dir(job["out"], job["case"], setup.name)
    fp = fingerprint.fingerprint(device)
    records.write_metrics(out / "metrics.csv", result["rows"])
    records.write_weights(out / "weights.csv", result["digest"])
    if result["probes"] is not None:
        records.write_probes(out / "probes.csv", result["probes"])
    records.write_json(out / "run.json", {
        **job["provenance"],
        "case": job["case"],
        "setup": setup.name,
        "status": "ok",
        "device": fp.get("gpu", "cpu"),
        "platform": fp["platform"],
        "backend": dist.get_backend(),
        "fingerprint": fp,
        "determinism": determinism,
        "pg_timeout_s": job["timeout_s"] + PG_TIMEOUT_MARGIN_S,
        "world_size": dist.get_world_size(),
        "mesh_shape": par.mesh_shape,
        "mesh_dim_names": par.mesh_dim_names,
        "setup_config": {k: v for k, v in setup.to_dict().items() if k != "train"},
        "train": setup.to_dict()["train"],
        "notes": par.notes,
        "timings": timings,
        "peak_memory": result["peak_memory"],
        "started": started,
        "ended": datetime.now(timezone.utc).isoformat(),
    })


def join_process_group(plan: dict) -> torch.device:
    """This rank's device, once the launch's process group has formed: nccl on the rank's GPU, else gloo."""
    timeout = timedelta(seconds=plan["timeout_s"] + PG_TIMEOUT_MARGIN_S)
    if plan["device"] == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return device


def start_up_timings(launched_at: float, started: float, imported: float) -> dict:
    """Where this launch's start-up went, across its ranks (every setup of the launch records it): until
    the first rank's interpreter started, until the last rank had imported torch, until the group formed."""
    starts = [None] * dist.get_world_size()
    dist.all_gather_object(starts, (started, imported))
    formed = time.time()
    first_start, last_import = min(s for s, _ in starts), max(i for _, i in starts)
    return {"torchrun_start_s": first_start - launched_at, "rank_imports_s": last_import - first_start,
            "process_group_s": formed - last_import}


def main(plan_path: str, rank_started: float | None = None) -> int:
    """Train every job of the plan in turn. `rank_started`: time.time() when this rank's interpreter began."""
    imported = time.time()
    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ["RANK"])
    shared = {k: plan[k] for k in ("out", "progress", "timeout_s")}
    jobs = [{**entry, **shared} for entry in plan["jobs"]]
    setups = [setup_from_dict(j["setup"]) for j in jobs]

    def log_to(job, setup):
        redirect_output(records.setup_dir(plan["out"], job["case"], setup.name) / f"rank{rank}.log")

    log_to(jobs[0], setups[0])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    determinism = apply_determinism(plan["determinism"])  # before CUDA and NCCL start
    device = join_process_group(plan)
    launch_timings = start_up_timings(plan["launched_at"], rank_started or imported, imported)
    current = f"{jobs[0]['case']}/{setups[0].name}"
    try:
        for job, setup in zip(jobs, setups):
            current = f"{job['case']}/{setup.name}"
            log_to(job, setup)
            print(f"== setup {setup.name} of case {job['case']} (rank {rank} of {dist.get_world_size()}) ==",
                  flush=True)
            if rank == 0:
                write_progress(job, setup, 0, setup.train.steps)  # the launcher starts this setup's clock
            dist.barrier()
            started = datetime.now(timezone.utc).isoformat()
            began = time.perf_counter()
            result = train_setup(setup, job, device)
            if rank == 0:
                timings = {**launch_timings, **result["timings"], "setup_s": time.perf_counter() - began}
                write_outputs(setup, job, result, started, device, determinism, timings)
            del result
            dist.barrier()
    except BaseException as e:  # noqa: BLE001 - report any failure in a form the launcher can find
        traceback.print_exc()
        # The time lets the launcher name the first failure: peers then fail on closed connections.
        print(f"{ERROR_MARK} {time.time():.6f} setup {current} rank {rank}: {type(e).__name__}: {e}", flush=True)
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    # Skip interpreter teardown: destroying gloo groups can hang; every rank passed the last barrier.
    os._exit(0)
