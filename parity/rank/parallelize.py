"""Turn a Setup into a device mesh and wrapped model(s), the way torchtitan applies parallelism.

Order per model (or per pipeline stage): tensor parallel plan, then data parallel per transformer
block, then at the root. Nothing here trains. API differences between torch releases are
feature-detected (hasattr / import probes), never assumed from a version number.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parity.case.schema import Setup



@dataclass
class Parallel:
    """What the training loop needs to know about a wrapped setup."""

    mesh: DeviceMesh | None
    modules: list[nn.Module]  # the model, or this rank's pipeline stage modules
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0
    schedule: object = None  # a torch.distributed.pipelining schedule when pp > 1
    stages: list = field(default_factory=list)  # its PipelineStages on this rank, one per module
    has_first_stage: bool = True
    has_last_stage: bool = True
    pp_group: object = None
    notes: list[str] = field(default_factory=list)  # feature-detection decisions, for run.json

    @property
    def mesh_shape(self):
        return list(self.mesh.shape) if self.mesh is not None else [1]

    @property
    def mesh_dim_names(self):
        return list(self.mesh.mesh_dim_names) if self.mesh is not None else []


def mesh_dims(s: Setup) -> dict[str, int]:
    """The mesh dims that exist for `s`, outermost first (the rule lives in parity.core.parallel_dims)."""
    return s.dims.mesh


def build_mesh(s: Setup, device_type: str) -> DeviceMesh | None:
    dims = mesh_dims(s)
    if not dims:
        return None
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def _local_rank(mesh: DeviceMesh | None, name: str) -> int:
    return mesh.get_local_rank(name) if mesh is not None and name in mesh.mesh_dim_names else 0


def _dp_mesh(s: Setup, mesh: DeviceMesh | None):
    """The (sub)mesh fully_shard / replicate span; None when the setup has no FSDP2 wrapper."""
    names = s.dims.dp_dims
    if not names:
        return None
    return mesh[names] if len(names) > 1 else mesh[names[0]]


# The modules whose output the TP plan below hands on as the same full tensor on every tp rank
# (ColwiseParallel with Replicate output, use_local_output). Every other probed module's output is a
# sequence shard (Shard(1)): a plain local tensor, or a DTensor where the style keeps one (norm's
# SequenceParallel). parity.rank.probes counts a replicated output on tp rank 0 only.
TP_REPLICATED_OUTPUTS = ("output",)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """torchtitan's llama plan with sequence parallel; skips modules a pipeline stage does not own."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    root = {}
    if model.tok_embeddings is not None:
        root["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        root["norm"] = SequenceParallel()
    if model.output is not None:
        root["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if root:
        parallelize_module(model, tp_mesh, root)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })


def _replicate_fn():
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError as e:  # older torch: only the DDP-based composable replicate exists
        raise RuntimeError(f"dp_api = \"replicate\" needs torch.distributed._composable.replicate_with_fsdp "
                           f"(torch {torch.__version__} lacks it): {e}") from None
    return replicate


def _mp_policy(s: Setup):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = lambda name: getattr(torch, name) if name else None  # noqa: E731
    return MixedPrecisionPolicy(param_dtype=dtype(s.param_dtype), reduce_dtype=dtype(s.reduce_dtype))


def dp_groups(model: nn.Module) -> list:
    """The FSDP / replicate groups, innermost first: each transformer block, then the root.

    This differs from torchtitan, which also gives the token embeddings a group of their own and
    norm with output one group, before the root. Each group's gradients are reduced in one
    collective, so the grouping decides where each value sits in the reduce buffer, and with it
    the rounding of the sum, so torchtitan's grouping would move the grad norm and the final
    weights in their last bits (measured: docs/measured.md, "Choices in the rank code"). Kept as
    is so that the committed bitwise baselines stay valid.
    """
    return list(model.layers.values()) + [model]


def apply_dp(model: nn.Module, s: Setup, dp_mesh, notes: list[str], pipelined: bool) -> nn.Module:
    """fully_shard or replicate on each of dp_groups, innermost first (torchtitan's order), the root last."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": dp_mesh, "mp_policy": _mp_policy(s)}
    if s.dp_api == "fully_shard":
        wrap = fully_shard
        if pipelined:  # each microbatch would re-gather the params otherwise (torchtitan does the same)
            kwargs["reshard_after_forward"] = False
    else:
        wrap = _replicate_fn()
    for group in dp_groups(model):
        wrap(group, **kwargs)
    if s.gradient_divide_factor is not None:
        _set_divide_factor(model, s.gradient_divide_factor, notes)
    return model


def _set_divide_factor(model: nn.Module, factor: float, notes: list[str]) -> None:
    wrapped = [m for m in model.modules() if hasattr(m, "set_gradient_divide_factor") or hasattr(m, "set_reduce_scatter_divide_factor")]
    # A factor other than the group size needs ReduceOp.PREMUL_SUM, which gloo lacks; force-sum
    # reduction sums and divides afterwards, which is the same arithmetic.
    force_sum = dist.get_backend() == "gloo"
    for m in wrapped:
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(factor)
        else:
            m.set_reduce_scatter_divide_factor(factor)
        if force_sum:
            if not hasattr(m, "set_force_sum_reduction_for_comms"):
                raise RuntimeError(f"gradient_divide_factor on gloo needs set_force_sum_reduction_for_comms, absent in torch {torch.__version__}")
            m.set_force_sum_reduction_for_comms(True)
    notes.append(f"gradient_divide_factor={factor!r}" + (" with force-sum reduction (gloo has no PREMUL_SUM)" if force_sum else ""))


def pipeline_stage_ids(s: Setup, pp_rank: int) -> list[int]:
    """Loop-style placement: rank r holds stages r, r + pp, ... (torchtitan's default for interleaved)."""
    return [pp_rank + i * s.pp for i in range(s.stages_per_rank)]


def stage_layers(n_layers: int, n_stages: int, stage: int) -> list[int]:
    """Contiguous, as even as possible; earlier stages take the remainder."""
    base, extra = divmod(n_layers, n_stages)
    start = stage * base + min(stage, extra)
    return list(range(start, start + base + (1 if stage < extra else 0)))


def stage_module(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of `model` holding only this stage's layers (tok_embeddings on the first stage, norm and
    output on the last). What the stage drops is never copied: deepcopy's memo hands back None for it."""
    keep = {str(i) for i in stage_layers(len(model.layers), n_stages, stage)}
    dropped = [layer for name, layer in model.layers.items() if name not in keep]
    if stage != 0:
        dropped.append(model.tok_embeddings)
    if stage != n_stages - 1:
        dropped += [model.norm, model.output]
    m = copy.deepcopy(model, memo={id(d): None for d in dropped})
    for name in [n for n, layer in m.layers.items() if layer is None]:
        del m.layers[name]
    return m


def _schedule(s: Setup, stages: list, loss_fn):
    from torch.distributed import pipelining

    cls = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
           "interleaved_1f1b": pipelining.ScheduleInterleaved1F1B}[s.pp_schedule]
    kwargs = {"n_microbatches": s.microbatches, "loss_fn": loss_fn}
    # scale_grads: each microbatch loss is a mean, so grads are summed over microbatches and must be divided.
    if "scale_grads" in inspect.signature(cls.__init__).parameters:
        kwargs["scale_grads"] = True
    return cls(stages if s.stages_per_rank > 1 else stages[0], **kwargs)


def parallelize(model: nn.Module, s: Setup, device: torch.device, loss_fn) -> Parallel:
    """Wrap `model` for setup `s`: on the meta device (allocated and loaded afterwards), except for DDP and
    a bare single model, which take the seed before wrapping and arrive allocated on `device`."""
    mesh = build_mesh(s, device.type)
    par = Parallel(mesh=mesh, modules=[model], dp_rank=_local_rank(mesh, "dp_replicate") * s.dp_shard + _local_rank(mesh, "dp_shard"),
                   pp_rank=_local_rank(mesh, "pp"), tp_rank=_local_rank(mesh, "tp"))
    if s.dp_api == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        par.modules = [DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)]
        return par
    if not s.dims.wraps:
        return par
    if s.pp > 1:
        from torch.distributed.pipelining import PipelineStage

        n_stages = s.pp * s.stages_per_rank
        ids = pipeline_stage_ids(s, par.pp_rank)
        par.pp_group = mesh["pp"].get_group()
        par.modules, stages = [], []
        for sid in ids:
            m = stage_module(model, sid, n_stages)
            _wrap(m, s, mesh, par.notes, pipelined=True)
            par.modules.append(m)
            stages.append(PipelineStage(m, sid, n_stages, device, group=par.pp_group))
        par.has_first_stage, par.has_last_stage = 0 in ids, n_stages - 1 in ids
        par.stages = stages
        par.schedule = _schedule(s, stages, loss_fn)
        return par
    _wrap(model, s, mesh, par.notes, pipelined=False)
    return par


def _wrap(m: nn.Module, s: Setup, mesh: DeviceMesh, notes: list[str], pipelined: bool) -> None:
    if s.tp > 1:
        apply_tp(m, mesh["tp"])
    dp_mesh = _dp_mesh(s, mesh)
    if dp_mesh is not None:
        apply_dp(m, s, dp_mesh, notes, pipelined)
