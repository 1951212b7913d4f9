"""The determinism settings: their defaults, what a case may relax, and applying them in a rank.

Every rank applies them (apply_determinism) before CUDA initialises and before the process group
exists; a case may relax one only by naming it in its `[determinism]` table (parity.case checks
the names and values against DETERMINISM and NCCL_CHOICES); run.json records what was in effect,
and a baseline's provenance carries determinism_summary (one of the fingerprint's bit fields on a
GPU). torch is imported inside apply_determinism, so the schema can import this module cheaply.
"""

from __future__ import annotations

import os

# NCCL: NVLS is nondeterministic between calls and CollNet depends on the fabric, so both are off.
# The algorithm is pinned to Ring: its reduction order is fixed by the topology (Megatron's
# deterministic mode chooses it for that reason and excludes Tree, whose intra-node chain order
# cannot be controlled), and Ring exists for every collective FSDP uses (reduce-scatter has no
# Tree). The protocol is pinned to Simple and the channel count to 1 (as torchtitan's
# batch-invariant mode does), since NCCL otherwise picks channels by message size and each
# channel reduces its slice along another path. What a Ring still does not pin is which physical
# ring an allocation receives, so exactness across machines stays a baseline (fingerprint) matter.
DETERMINISM = {
    "deterministic_algorithms": True,  # strict: warn_only keeps flash/efficient attention backward nondeterministic
    "cudnn_benchmark": False,
    "tf32": False,  # matmul and cuDNN
    "reduced_precision_reduction": False,  # fp16/bf16 GEMMs accumulate without reduced-precision split-K
    "nccl_algo": "Ring",
    "nccl_proto": "Simple",
    "nccl_channels": 1,  # 0: NCCL chooses
    "nccl_nvls": False,
    "nccl_collnet": False,
}
# "auto" leaves the variable unset, so NCCL chooses (a relaxation, recorded as such).
NCCL_CHOICES = {"nccl_algo": ("Ring", "Tree", "auto"), "nccl_proto": ("Simple", "LL", "LL128", "auto")}
CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # cuBLAS is only deterministic with a fixed workspace (set before CUDA starts)


def nccl_env(settings: dict) -> dict[str, str | None]:
    """The NCCL variables the settings pin; None means unset (NCCL chooses)."""
    auto = lambda v: None if v == "auto" else v  # noqa: E731
    channels = str(settings["nccl_channels"]) if settings["nccl_channels"] else None
    return {"NCCL_ALGO": auto(settings["nccl_algo"]), "NCCL_PROTO": auto(settings["nccl_proto"]),
            "NCCL_MIN_NCHANNELS": channels, "NCCL_MAX_NCHANNELS": channels,
            "NCCL_NVLS_ENABLE": "1" if settings["nccl_nvls"] else "0",
            "NCCL_COLLNET_ENABLE": "1" if settings["nccl_collnet"] else "0"}


def apply_determinism(settings: dict) -> dict:
    """Set everything in the process (call before CUDA initialises and before init_process_group).

    Returns the record for run.json: the settings, the ones the case relaxed, and what torch and
    the environment report as in effect afterwards.
    """
    import torch

    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    for key, value in nccl_env(settings).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    torch.use_deterministic_algorithms(settings["deterministic_algorithms"], warn_only=False)
    torch.backends.cudnn.deterministic = settings["deterministic_algorithms"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    torch.backends.cuda.matmul.allow_tf32 = settings["tf32"]
    torch.backends.cudnn.allow_tf32 = settings["tf32"]
    matmul = torch.backends.cuda.matmul
    matmul.allow_fp16_reduced_precision_reduction = settings["reduced_precision_reduction"]
    matmul.allow_bf16_reduced_precision_reduction = settings["reduced_precision_reduction"]
    return {
        "settings": dict(settings),
        "relaxed": sorted(k for k, v in settings.items() if v != DETERMINISM[k]),
        "in_effect": {
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "allow_fp16_reduced_precision_reduction": matmul.allow_fp16_reduced_precision_reduction,
            "allow_bf16_reduced_precision_reduction": matmul.allow_bf16_reduced_precision_reduction,
        },
        # Every NCCL variable in effect, including ones the user set that we do not pin.
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith("NCCL_") or k in ("CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS")},
    }


def determinism_summary(settings: dict) -> str:
    """One line for a baseline's provenance: every setting, in a fixed order."""
    return " ".join(f"{k}={settings.get(k, DETERMINISM[k])}" for k in DETERMINISM)
