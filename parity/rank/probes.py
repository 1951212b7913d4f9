"""Logical probes: numbers that describe the logical tensor (unsharded, over the whole global batch),
so that any two layouts of one training (one process, FSDP, HSDP, TP, PP, DDP) can be compared
module by module and parameter by parameter, and a difference located where it starts.

Per probed step, in float64:
- forward: the sum of squares of each probed module's output (parity.core.presets.probe_modules order);
- backward: the sum of squares of each parameter's gradient before clipping (reverse parameter order);
- update: the sum of squares of each parameter's step update, after minus before (parameter order).

Each rank adds up the pieces it counts: forward outputs on every data-parallel rank (they hold
different rows) and every microbatch and every tensor-parallel sequence shard, a tp-replicated
output on tp rank 0 only; parameters by parity.rank.shards.local_box (the rule the weight sketches use).
A pipeline stage holds some modules and parameters and adds zeros for the rest. One
all_reduce(SUM) per probed step adds the ranks up, as one vector whose order every rank derives
from the model config. Nothing waits for the device in the step loop: the sums stay on it and are
copied to the host once, after the last step. Element counts (host integers, from shapes) are
reduced once at the end and checked: every element of every logical tensor counted exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parity.rank.parallelize import TP_REPLICATED_OUTPUTS, Parallel
from parity.core.presets import param_names, probe_modules
from parity.rank.shards import local_box

STAT = "sumsq"


def sumsq(t: torch.Tensor) -> torch.Tensor:
    # float64 squares of float32 (or bf16) values are exact; only the sum rounds.
    return t.detach().to(torch.float64).square().sum()


def local_name(name: str) -> str:
    return name.removeprefix("module.")  # DDP


def output_piece(out, name: str, par: Parallel) -> tuple[torch.Tensor, bool]:
    """A module output's local tensor, and whether this rank counts it."""
    if hasattr(out, "placements"):  # a DTensor (SequenceParallel keeps one): its own placements say
        coord = out.device_mesh.get_coordinate()
        for dim, placement in enumerate(out.placements):
            if placement.is_partial():
                raise RuntimeError(f"probes: {name} outputs a Partial DTensor; nothing to count until it is reduced")
            if placement.is_replicate() and coord[dim] != 0:
                return out.to_local(), False
        return out.to_local(), True
    # A plain tensor: the whole output (no TP), a sequence shard, or a tp-replicated copy.
    return out, not (name in TP_REPLICATED_OUTPUTS and par.tp_rank != 0)


class ProbeRecorder:
    """Collects one setup's probes on this rank; attach after parallelize, before the first step."""

    def __init__(self, model: torch.nn.Module, par: Parallel, cfg, global_batch: int, seq_len: int,
                 steps: list[int], device: torch.device):
        self.par, self.device, self.steps = par, device, set(steps)
        self.modules, self.params = probe_modules(cfg), param_names(cfg)
        # The full model every rank builds: its names must be the presets' (one home of the names).
        found = [n for n, _ in model.named_parameters()]
        if found != self.params:
            raise RuntimeError(f"probes: the model's parameters {found[:3]}... are not parity.core.presets.param_names")
        missing = set(self.modules) - {n for n, _ in model.named_modules()}
        if missing:
            raise RuntimeError(f"probes: the model has no module {sorted(missing)[0]} of parity.core.presets.probe_modules")
        numel = {n: p.numel() for n, p in model.named_parameters()}
        width = {n: cfg.vocab_size if n == "output" else cfg.dim for n in self.modules}
        # What each probe must count over the ranks, per probed step (checked once, at the end).
        self.expected = ([global_batch * seq_len * width[n] for n in self.modules]
                         + [numel[n] for n in reversed(self.params)] + [numel[n] for n in self.params])
        self.counts = [0] * len(self.expected)
        # The parameters this rank counts (local_box: its shard, or its copy where it is the one that counts).
        self.held = {local_name(n): p for m in par.modules for n, p in m.named_parameters()}
        self.counted = {n: p for n, p in self.held.items() if local_box(p, par) is not None}
        self.zero = torch.zeros((), dtype=torch.float64, device=device)
        self.forward: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self.recording = False
        # Pipeline stages run their modules once more than they train: torch infers the shapes a
        # stage sends by a forward on real (2.13) or meta tensors. Only the microbatch forwards count.
        self.in_forward = 0 if par.stages else None
        self.grads: list[torch.Tensor] = []
        self.before: dict[str, torch.Tensor] = {}
        self.reduced: list[tuple[int, torch.Tensor]] = []
        self._hook_modules()
        for stage in par.stages:
            self._gate(stage)

    def _gate(self, stage) -> None:
        """Mark the stage's training forwards (PipelineStage.forward_maybe_with_nosync, one per microbatch)."""
        real = getattr(stage, "forward_maybe_with_nosync", None)
        if real is None:
            raise RuntimeError(f"probes: torch {torch.__version__}'s PipelineStage has no forward_maybe_with_nosync, "
                               "the microbatch forward probes count; allowed: [probes] enabled = false for this case")

        def forward(*args, **kwargs):
            self.in_forward += 1
            try:
                return real(*args, **kwargs)
            finally:
                self.in_forward -= 1

        stage.forward_maybe_with_nosync = forward

    def _hook_modules(self) -> None:
        slot = {n: i for i, n in enumerate(self.modules)}
        for m in self.par.modules:  # the model, or this rank's pipeline stages (FQNs kept, layers removed)
            for name, module in m.named_modules():
                name = local_name(name)
                if name in slot:
                    module.register_forward_hook(self._forward_hook(slot[name], name))

    def _forward_hook(self, i: int, name: str):
        def hook(module, args, out):
            if not self.recording or self.in_forward == 0 or out.device.type == "meta":
                return
            with torch.no_grad():
                local, counted = output_piece(out, name, self.par)
                if counted:  # every microbatch adds its rows
                    self.forward[i].append(sumsq(local))
                    self.counts[i] += local.numel()
        return hook

    def start(self, step: int) -> bool:
        """Whether `step` is probed; if so, the forward hooks record from now on."""
        self.recording = step in self.steps
        return self.recording

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def record_grads(self) -> None:
        """The pre-clip gradients, in backward order (call after any planted gradient fault, before clipping)."""
        base = len(self.modules)
        for j, name in enumerate(reversed(self.params)):
            p = self.held.get(name)
            g = None if p is None or p.grad is None else self._grad_piece(p.grad)
            if g is None:
                self.grads.append(self.zero)
                continue
            self.grads.append(sumsq(g))
            self.counts[base + j] += g.numel()

    def _grad_piece(self, g) -> torch.Tensor | None:
        """The part of a gradient this rank counts, by the gradient's own placements: without a data-parallel
        wrapper they may differ from the parameter's (pure TP: the embedding's gradient Replicate, RMSNorm
        weights' Partial). A Partial gradient is summed over its ranks first: a collective that every rank
        holding the parameter makes, in the same order; p.grad itself stays as it was."""
        if hasattr(g, "placements") and any(pl.is_partial() for pl in g.placements):
            from torch.distributed.tensor import Replicate

            g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
        box = local_box(g, self.par)
        return None if box is None else box[0]

    @torch.no_grad()
    def before_update(self) -> None:
        self.before = {n: self._local(p).detach().clone() for n, p in self.counted.items()}

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        """The update sums, then the step's one all_reduce over the world."""
        base = len(self.modules) + len(self.params)
        updates = []
        for j, name in enumerate(self.params):
            if name not in self.before:
                updates.append(self.zero)
                continue
            after = self._local(self.counted[name]).detach()
            updates.append(sumsq(after.to(torch.float64) - self.before[name].to(torch.float64)))
            self.counts[base + j] += after.numel()
        forward = [torch.stack(v).sum() if len(v) > 1 else v[0] if v else self.zero for v in self.forward]
        vector = torch.stack(forward + self.grads + updates)
        dist.all_reduce(vector)  # default group: the world
        self.reduced.append((step, vector))
        self.forward = [[] for _ in self.modules]
        self.grads, self.before, self.recording = [], {}, False

    def rows(self) -> list[dict]:
        """probes.csv rows, in causal order; the one copy to the host, after the last step. Collective."""
        self._check_counts()
        if not self.reduced:
            return []
        values = torch.stack([v for _, v in self.reduced]).tolist()
        names = ([("forward", n) for n in self.modules] + [("backward", n) for n in reversed(self.params)]
                 + [("update", n) for n in self.params])
        return [{"step": step, "phase": phase, "name": name, "stat": STAT, "value": value}
                for (step, _), row in zip(self.reduced, values) for (phase, name), value in zip(names, row)]

    def _check_counts(self) -> None:
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.device)  # exact below 2^53
        dist.all_reduce(counts)
        n = len(self.reduced)
        names = ([f"forward {m}" for m in self.modules] + [f"backward {p}" for p in reversed(self.params)]
                 + [f"update {p}" for p in self.params])
        for name, got, want in zip(names, counts.tolist(), self.expected):
            if got != want * n:
                raise RuntimeError(f"probes: {name}: the ranks counted {got:.0f} elements over {n} probed steps, "
                                   f"expected {want * n} (each element of the logical tensor exactly once)")
