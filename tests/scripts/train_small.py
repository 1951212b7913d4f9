"""A small user training script: what a `trainer = "command"` setup runs.

It trains parity's own model, on parity's own data, the way parity's built-in trainer trains a
world-size-1 setup with dp_api = "none" (parity.rank.train.train_setup), but with its own plain loop,
the way a user's script would: so the two must agree bitwise, and any difference is a bug in one
of them or in how parity reads this script's metrics back.

    python tests/scripts/train_small.py --seed-checkpoint DIR --out DIR --steps N --metrics jsonl

--metrics picks how the numbers leave the script, one route per reader of parity.trainers.readers:
  tensorboard  SummaryWriter scalars under OUT/tb (tags loss, grad_norm, lr, tokens)
  jsonl        OUT/metrics.jsonl, one json.dumps object per step (floats written by repr)
  log          a line per step on stdout: `step 3 loss 7.93... grad_norm 0.36... lr 0.005 tokens 2048`
--log-decimals N (with --metrics log) prints loss, grad_norm and lr with N decimals instead of repr,
as torchtitan's logger does: text that no longer carries every bit (parity's regex reader, exact = false).
--scale-grad X multiplies every gradient by X before the norm: a planted bug for tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: parity lives two levels up

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from parity.rank.data import Batches
from parity.rank.model import build_model
from parity.core.presets import PRESETS

# parity.case.schema.Train's defaults (tests/test_readers.py checks they still are). Not imported from
# parity.case.schema: a user's script knows nothing of the harness's case format.
DEFAULTS = argparse.Namespace(model="debugmodel", seed=42, global_batch=16, seq_len=128, lr=5e-3, warmup_steps=2,
                              max_norm=0.4, weight_decay=0.1, dtype="float32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed-checkpoint", required=True, help="torch.distributed.checkpoint directory of the initial weights")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--metrics", required=True, choices=("tensorboard", "jsonl", "log"))
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--global-batch", type=int, default=DEFAULTS.global_batch)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS.warmup_steps)
    p.add_argument("--max-norm", type=float, default=DEFAULTS.max_norm)
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    p.add_argument("--model", default=DEFAULTS.model, choices=sorted(PRESETS))
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=("float32", "float64", "bfloat16"))
    # parity's launcher gives every rank one thread (OMP_NUM_THREADS=1); CPU kernels may split their
    # reductions by thread count, so agreeing bitwise with it on CPU means one thread here too.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights-out", type=Path, help="torch.save the final state dict (plain tensors) here")
    p.add_argument("--scale-grad", type=float, default=None, help="planted bug: multiply gradients by X before the norm")
    p.add_argument("--log-decimals", type=int, default=None, metavar="N",
                   help="with --metrics log: print loss, grad_norm and lr as f'{x:.Nf}' instead of repr (rounded)")
    args = p.parse_args(argv)
    if args.log_decimals is not None and (args.metrics != "log" or args.log_decimals < 0):
        p.error("--log-decimals N needs --metrics log and N >= 0")
    return args


class MetricsOut:
    """One step's numbers, out by the chosen route. Floats are never formatted (repr or binary only),
    unless log_decimals asks for rounded log text."""

    def __init__(self, route: str, out: Path, log_decimals: int | None = None):
        self.route = route
        self.log_decimals = log_decimals
        out.mkdir(parents=True, exist_ok=True)
        if route == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out / "tb"))
        elif route == "jsonl":
            self.jsonl = open(out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def step(self, step: int, loss: float, grad_norm: float, lr: float, tokens: int):
        if self.route == "tensorboard":
            # loss and grad_norm are float32 values, so TensorBoard's float32 scalars hold them exactly.
            # lr is a Python double (0.0025 is no float32): written as a float64 tensor to stay exact.
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("grad_norm", grad_norm, step)
            self.tb.add_scalar("lr", lr, step, new_style=True, double_precision=True)
            self.tb.add_scalar("tokens", tokens, step)
        elif self.route == "jsonl":
            # json.dumps writes floats by repr (NaN as the NaN literal), which parses back to the same double.
            self.jsonl.write(json.dumps({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                         "tokens": tokens}) + "\n")
            self.jsonl.flush()
        elif self.log_decimals is not None:
            n = self.log_decimals
            print(f"step {step} loss {loss:.{n}f} grad_norm {grad_norm:.{n}f} lr {lr:.{n}f} tokens {tokens}", flush=True)
        else:
            print(f"step {step} loss {loss!r} grad_norm {grad_norm!r} lr {lr!r} tokens {tokens}", flush=True)

    def close(self):
        if self.route == "tensorboard":
            self.tb.close()
        elif self.route == "jsonl":
            self.jsonl.close()


def loss_fn(logits, labels):
    # Cross-entropy in at least float32, as parity (and torchtitan) compute it.
    return F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), labels.flatten())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    dtype = getattr(torch, args.dtype)
    cfg = PRESETS[args.model]

    model = build_model(cfg, args.seq_len, args.seed, dtype)
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming ... single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=args.seed_checkpoint)
    model.load_state_dict(state)

    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay,
                            foreach=False)
    batches = Batches(args.seed, args.global_batch, args.seq_len, cfg.vocab_size)
    out = MetricsOut(args.metrics, args.out, args.log_decimals)
    tokens = args.global_batch * args.seq_len
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / max(args.warmup_steps, 1))  # linear warmup; step 1 already trains
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, labels = (torch.from_numpy(a) for a in batches.local(step, 1, 0))
        with sdpa_kernel([SDPBackend.MATH]):  # the attention kernel parity pins by default
            loss = loss_fn(model(inputs), labels)
            loss.backward()
        if args.scale_grad is not None:
            for p in params:
                p.grad.mul_(args.scale_grad)
        norm = get_total_norm([p.grad for p in params], norm_type=2.0)  # pre-clip, recorded either way
        if args.max_norm > 0:
            clip_grads_with_norm_(params, args.max_norm, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.step(step, loss.item(), norm.item(), lr, tokens)
    out.close()
    if args.weights_out:
        args.weights_out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.weights_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
