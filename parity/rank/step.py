"""The parts of one training step on this rank: the batch on the device, forward and backward,
the gradient norm and the clip.

Nothing here waits for the device: losses and norms stay on it as tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parity.case.schema import Setup, Train
from parity.rank.parallelize import Parallel


def sdpa_context(backend: str):
    """A context that restricts scaled_dot_product_attention to the named backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    return sdpa_kernel([chosen])


def loss_fn(logits, labels):
    # At least float32 (bf16 logits are upcast, as torchtitan does); a float64 oracle stays float64.
    return F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), labels.flatten())


def make_optimizer(params, train: Train) -> torch.optim.AdamW:
    """The optimizer every parity rank steps; benchmarks/scale.py's floor part steps it too, to cost the same step."""
    return torch.optim.AdamW(params, lr=train.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=train.weight_decay,
                             foreach=False)


def to_device(array, device: torch.device) -> torch.Tensor:
    """A host batch on the device without waiting for it: a copy from pageable memory would
    synchronize the stream, i.e. wait for every step still queued."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def forward_backward(par: Parallel, setup: Setup, inputs, labels) -> list[torch.Tensor] | None:
    """This rank's per-microbatch losses, left on the device (None where no loss lives: non-last PP stages)."""
    n = setup.microbatches
    if par.schedule is not None:
        losses = [] if par.has_last_stage else None
        target = labels if par.has_last_stage else None
        if par.has_first_stage:
            par.schedule.step(inputs, target=target, losses=losses)
        else:
            par.schedule.step(target=target, losses=losses)
        return [l.detach() for l in losses] if losses is not None else None
    model = par.modules[0]
    total = []
    for x, y in zip(inputs.chunk(n), labels.chunk(n)):
        loss = loss_fn(model(x), y)
        (loss / n if n > 1 else loss).backward()
        total.append(loss.detach())
    return total


def grad_groups(par: Parallel) -> list[list]:
    """Parameters with gradients, grouped by DTensor mesh (clipping cannot mix meshes)."""
    groups: dict = {}
    for m in par.modules:
        for p in m.parameters():
            if p.grad is not None:
                groups.setdefault(getattr(p, "device_mesh", None), []).append(p)
    return list(groups.values())


def grad_norm(par: Parallel, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, stage): the pre-clip L2 norm of every gradient over the whole model, across DTensor
    meshes and pipeline stages, and the norm of this pipeline stage's gradients alone (the same
    tensor where there is one mesh and no pipeline)."""
    from torch.nn.utils import get_total_norm

    norms = []
    for params in grad_groups(par):
        n = get_total_norm([p.grad for p in params], norm_type=2.0)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if len(norms) == 1 and par.pp_group is None:
        return norms[0], norms[0]  # no re-squaring: keeps the single-mesh norm exactly as torch computes it
    # At least float32 (bf16 norms are upcast); a float64 oracle's norm stays float64.
    sq = (torch.stack([n.to(torch.promote_types(n.dtype, torch.float32)) ** 2 for n in norms]).sum()
          if norms else torch.zeros((), device=device))
    stage = sq.sqrt()
    if par.pp_group is not None:
        dist.all_reduce(sq, group=par.pp_group)
    return sq.sqrt(), stage


def clip_grads(par: Parallel, max_norm: float, norm: torch.Tensor) -> None:
    """Scale every gradient by max_norm / norm where norm exceeds max_norm (max_norm 0: no clipping)."""
    from torch.nn.utils import clip_grads_with_norm_

    if max_norm > 0:
        for params in grad_groups(par):
            clip_grads_with_norm_(params, max_norm, norm)
