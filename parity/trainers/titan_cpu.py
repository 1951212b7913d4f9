"""Run torchtitan's own trainer on CPU with gloo ranks: `-m parity.trainers.titan_cpu ARGS...`.

Started by torchrun (`python -m torch.distributed.run --standalone --nproc-per-node=N -m
parity.trainers.titan_cpu <torchtitan CLI args>`); the args go to `torchtitan.train` after
CPU_FLAGS (fp32 parameters, the partial_dtensor SPMD backend) and before `activation-checkpoint:none`
(see below). It edits no torchtitan file. In memory, before torchtitan's trainer is imported, it changes:

1. Device: torchtitan picks `device_type = _get_available_device_type() or "cuda"` at import, so
   on a CPU-only torch it would call torch.cuda (and choose NCCL). We set `device_type="cpu"` and
   a `torch.cpu`-based device module whose memory queries are stubs (memory metrics read -1).
   torchtitan then builds gloo process groups itself.
2. Gradient reduction: torchtitan sets every FSDP/replicate module's divide factor to 1.0 and
   scales gradients itself; torch's FSDP turns factor 1.0 into ReduceOp.PREMUL_SUM(1/1.0), which
   gloo lacks (the run would crash). Only for factor 1.0 we also force plain SUM reductions. That
   is the same arithmetic: PREMUL_SUM(1/1.0) multiplies every element by exactly 1.0 (an IEEE
   identity) before the same sum, and under force-sum FSDP skips its divide by 1.0. Any other
   factor is left alone, so a setup that asks for a real division still gets it (or gloo's
   error), never a silently different one.
3. `torch.distributed.set_timeout` (newer-torch API torchtitan calls after step 1) is provided
   by torch 2.13's `distributed_c10d._set_pg_timeout`; it only changes collective timeouts.
4. Attention: FlexAttention has no CPU backward, so every `FlexAttention.Config` in the parsed
   config tree becomes `ScaledDotProductAttention.Config` (plain causal SDPA, the "maskless"
   backend torchtitan's trainer supports). Positions still drive RoPE, but packed documents are
   no longer masked from each other, so losses differ from GPU reference curves.
5. Pipeline schedules: torchtitan calls `schedule.step(arg_mbs=, kwarg_mbs=, target_mbs=)` with
   microbatches it already split (a newer-torch API); torch 2.13's `step` would treat those as
   model kwargs. Such calls go straight to the schedule's own `_step_microbatches` after the same
   per-step reset `step` does; whole-batch calls are untouched. Only runs with PP use it.

None of this biases a comparison between setups: every setup of a case runs through this same
module, so each gets the same device, the same attention and the same (exact) sum reduction.
Items 1-4 apply at every world size and layout alike and depend on no CLI flag of the run; item 5
runs the same schedule torch's own `step` would, on the microbatches torchtitan made.
"""

import os
import sys

PARENT = os.getppid()  # first: the launcher this rank must die with

from parity.core.lifeline import die_with_parent, orphaned  # noqa: E402

die_with_parent()  # before the slow imports: a killed torchrun takes this rank down
if orphaned(PARENT):
    sys.exit("parity titan_cpu: its launcher is gone; exiting")

import inspect  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _cpu_device_module() -> types.ModuleType:
    """torch.cpu plus the CUDA-style queries torchtitan calls (memory ones as stubs)."""
    mod = types.ModuleType("parity_cpu_device")
    mod.__dict__.update({k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("_")})
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mod.current_device = lambda: 0  # torch.cpu's returns "cpu"; barrier(device_ids=[...]) needs an int
    mod.get_device_name = lambda *a, **k: "cpu"
    mod.get_device_properties = lambda *a, **k: types.SimpleNamespace(name="cpu", total_memory=total)
    mod.memory_stats = lambda *a, **k: {}
    mod.reset_peak_memory_stats = lambda *a, **k: None
    mod.empty_cache = lambda *a, **k: None
    return mod


def _patch() -> None:
    # 1. Device: must precede any import of torchtitan modules that copy these names.
    import torchtitan.tools.utils as tt_utils

    tt_utils.device_type, tt_utils.device_module = "cpu", _cpu_device_module()

    # 2. Exact SUM instead of PREMUL_SUM(1.0), which gloo lacks (see docstring).
    from torch.distributed.fsdp import FSDPModule

    set_factor = FSDPModule.set_gradient_divide_factor

    def set_gradient_divide_factor(self, factor: float) -> None:
        set_factor(self, factor)
        if factor == 1.0:
            self.set_force_sum_reduction_for_comms(True)

    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor

    # 3. API from newer torch.
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = dist.distributed_c10d._set_pg_timeout

    # 4. Flex attention -> SDPA, on the parsed config, before the trainer builds anything.
    from torchtitan.config.manager import ConfigManager
    from torchtitan.models.common.attention import (
        FlexAttention,
        ScaledDotProductAttention,
    )

    parse_args = ConfigManager.parse_args

    def parse_args_sdpa(self, *args, **kwargs):
        config = parse_args(self, *args, **kwargs)
        for _fqn, _cfg, parent, attr in list(config.traverse(FlexAttention.Config)):
            if isinstance(parent, list):
                parent[attr] = ScaledDotProductAttention.Config()
            else:
                setattr(parent, attr, ScaledDotProductAttention.Config())
        return config

    ConfigManager.parse_args = parse_args_sdpa

    # 5. Pre-split pipeline microbatches (API from newer torch), only where torch lacks it.
    from torch.distributed.pipelining import schedules

    for cls in (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti):
        if "kwarg_mbs" not in inspect.signature(cls.step).parameters:
            cls.step = _presplit_step(cls.step)


def _presplit_step(step):
    def presplit_step(self, *args, losses=None, return_outputs=True, loss_kwargs=None, **kwargs):
        if "kwarg_mbs" not in kwargs:
            return step(self, *args, losses=losses, return_outputs=return_outputs,
                        loss_kwargs=loss_kwargs, **kwargs)
        arg_mbs, kwarg_mbs = kwargs.pop("arg_mbs", None), kwargs.pop("kwarg_mbs")
        target_mbs = kwargs.pop("target_mbs", None)
        if args or kwargs or return_outputs:
            raise TypeError(f"unexpected pre-split step() call: {sorted(kwargs)}")
        for stage in getattr(self, "_stages", None) or [self._stage]:  # what step() resets
            stage.has_backward = self._has_backward
            stage.clear_runtime_states()
        self._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs,
                                loss_kwargs=loss_kwargs)

    return presplit_step


# Flags every CPU run gets ahead of its own (a setup's args come later and win):
# - torch 2.13's FSDP lacks the spmd_types integration torchtitan 0.3.0 defaults to;
# - bf16 compute is about 8x slower than fp32 on a CPU without AVX512-BF16 (the seed checkpoint is
#   fp32 anyway). Every setup of a case gets the same precision, so the comparison is unchanged.
CPU_FLAGS = ["--parallelism.spmd-backend", "partial_dtensor", "--training.mixed-precision-param", "float32"]
# torchtitan's subcommand (it must come last): selective activation checkpointing recomputes
# forwards, which costs CPU time and changes no number. Added only where the args choose none.
NO_AC = "activation-checkpoint:none"


def main() -> None:
    _patch()
    from torchtitan.train import main as titan_main

    args = sys.argv[1:]
    chosen_ac = any(a.startswith("activation-checkpoint:") for a in args)
    sys.argv[1:] = [*CPU_FLAGS, *args, *([] if chosen_ac else [NO_AC])]
    titan_main()  # parses sys.argv[1:], exactly as `python -m torchtitan.train` would


if __name__ == "__main__":
    main()
