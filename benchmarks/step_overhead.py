"""Harness overhead per training step, at world size 1, in one process.

The same model, batch, optimizer and determinism settings run twice: as a bare PyTorch loop
(forward, backward, clip, AdamW step; nothing read back), and as parity's own training loop
(parity.rank.train.train_setup, which also keeps every loss and grad norm and writes the progress
file). Both are timed with the same clock (CUDA events on a GPU), alternating bare and harness
rounds so that drift hits both; the first steps of every round are left out as warm-up.

    python benchmarks/step_overhead.py [--device cpu|cuda] [--model debugmodel] [--dtype float32]
                                       [--attention math] [--steps 30] [--warmup 5] [--rounds 2]

Prints both median step times and the harness/bare step-time ratio (target on a GPU: at most 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parity.core import determinism, fingerprint  # noqa: E402

from parity.rank import train  # noqa: E402
from parity.rank.build import load_seed  # noqa: E402
from parity.rank.step import loss_fn, sdpa_context, to_device  # noqa: E402
from parity.rank.data import Batches  # noqa: E402
from parity.rank.model import build_model  # noqa: E402
from parity.trainers.seed import resolve_seed  # noqa: E402
from parity.case.schema import Setup, Train  # noqa: E402


def bare_loop(t: Train, ckpt: str, device: torch.device) -> list[float]:
    """What a user would write: no metrics kept, no host reads."""
    model = build_model(t.model_config, t.seq_len, t.seed, getattr(torch, t.dtype)).to(device)
    load_seed([model], ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=t.weight_decay,
                            foreach=False)
    batches = Batches(t.seed, t.global_batch, t.seq_len, t.model_config.vocab_size, t.data)
    clock = train.StepClock(device)
    for step in range(1, t.steps + 1):
        clock.mark()
        for group in opt.param_groups:
            group["lr"] = t.lr * min(1.0, step / max(t.warmup_steps, 1))
        inputs, labels = (to_device(a, device) for a in batches.local(step, 1, 0))  # as the harness does
        with sdpa_context(t.attention):
            loss_fn(model(inputs), labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.mark()
    return clock.seconds()


def harness_loop(t: Train, ckpt: str, device: torch.device, out: str) -> list[float]:
    setup = Setup(name="bench", train=t, dp_api="none")
    with contextlib.redirect_stdout(io.StringIO()):  # the rank's per-step log lines (printed after the steps)
        job = {"seed_checkpoint": ckpt, "probe_steps": [], "case": "bench", "progress": str(Path(out) / "progress")}
        result = train.train_setup(setup, job, device)
    return [r["step_time_s"] for r in result["rows"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="debugmodel")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", default="math")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # as every parity rank does
    determinism.apply_determinism(determinism.DETERMINISM)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if args.device == "cuda" else "gloo"
    kwargs = {"device_id": device} if args.device == "cuda" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    t = Train(model=args.model, steps=args.steps, dtype=args.dtype, attention=args.attention)
    ckpt = str(resolve_seed(t.model, t.seed, t.dtype, None).path)
    bare, harness = [], []
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as out:
        for _ in range(args.rounds):
            bare += bare_loop(t, ckpt, device)[args.warmup:]
            harness += harness_loop(t, ckpt, device, out)[args.warmup:]
    dist.destroy_process_group()
    b, h = statistics.median(bare), statistics.median(harness)
    fp = fingerprint.fingerprint(device)
    where = fp.get("gpu") or f"cpu {fp['cpu_model']} ({fp['cpu_capability']}, {fp['threads']} thread(s))"
    print(f"step overhead on {where}, torch {fp['torch']}: {args.model} {args.dtype} {args.attention} attention, "
          f"{args.rounds} rounds x {args.steps - args.warmup} timed steps")
    print(f"  bare loop: median {b * 1e3:.3f} ms/step")
    print(f"  harness:   median {h * 1e3:.3f} ms/step")
    print(f"harness/bare step-time ratio: {h / b:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
