"""What both sides need to know about the machine: platform key, fingerprint, determinism settings.

The rank side (parity.rank.train) applies the determinism settings and records the fingerprint into
run.json; the host side (spec, baselines) validates the settings and decides whether a baseline
was made on a machine whose bits are comparable. torch is imported inside the functions that
need it, so spec and the pytest plugin can import this module cheaply.

    python -m parity.core.fingerprint [--device cpu|cuda]    prints this machine's fingerprint as JSON
"""

from __future__ import annotations

import json
import os
import re
import subprocess

# ---- determinism ----------------------------------------------------------------------------
#
# Every rank applies these before CUDA initialises and before the process group exists. A case
# may relax one only by naming it in its `[determinism]` table; run.json records what was in effect.
#
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


# ---- platform key ----------------------------------------------------------------------------


def platform_key(device_name: str, sm_count: int | None = None) -> str:
    """The hardware class a baseline is valid for (part of its file name).

    - "cpu" (any device name starting with "cpu") -> "cpu".
    - A GPU -> "cuda-<model>-sm<SMs>", where <model> is the first word of the device name, after
      dropping the vendor word "NVIDIA", that is letters followed by digits (and optional
      letters): "NVIDIA H100 80GB HBM3" with 132 SMs -> "cuda-h100-sm132", "NVIDIA A100-SXM4-80GB"
      -> "cuda-a100-sm108", "NVIDIA L40S" -> "cuda-l40s-sm142". The SM count is in the key because
      it changes bits (kernels split work by it): an H100 SXM (132 SMs) and an H100 PCIe (114)
      must not share an exact baseline. Memory size and form factor words are left out.
    - No such word: "cuda-" + the lowercased name with every run of non-alphanumerics turned
      into "-" ("NVIDIA GeForce RTX 4090" -> "cuda-nvidia-geforce-rtx-4090-sm128").
    """
    name = (device_name or "").strip().lower()
    if name.startswith("cpu"):
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w and w != "nvidia"]
    model = next((w for w in words if re.fullmatch(r"[a-z]+\d+[a-z]*", w)), None)
    key = "cuda-" + (model or re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown")
    return key + (f"-sm{sm_count}" if sm_count else "")


# ---- fingerprint -----------------------------------------------------------------------------

# The fields that change bits, per platform: an exact baseline comparison needs every one equal.
# CPU kernels dispatch on the instruction set, and intra-op threads split reductions. The
# instruction set alone is not enough: the same torch build on an AMD EPYC with AVX512 gives
# float32 results one ULP away from those made on another AVX512 machine (MKL and oneDNN choose
# kernels by CPU model, not only by ISA level), so the CPU model is a bit field too. On a GPU the
# model and SM count (also in the platform key), the libraries that compute (CUDA, cuDNN, NCCL),
# the driver (it JIT-compiles any kernel shipped as PTX only) and the determinism settings.
BIT_FIELDS = {
    "cpu": ("torch", "cpu_model", "cpu_capability", "threads"),
    "cuda": ("torch", "gpu", "sm_count", "compute_capability", "cuda", "cudnn", "nccl", "driver", "determinism"),
}
# Baselines made before a field was recorded: what it was then. Runs have always had OMP_NUM_THREADS=1.
MISSING_MEANS = {"threads": "1"}


def bit_fields(platform: str) -> tuple[str, ...]:
    return BIT_FIELDS["cpu" if platform == "cpu" else "cuda"]


def differing_fields(platform: str, baseline: dict, run: dict) -> list[str]:
    """The bit-changing fields whose values differ between a baseline's provenance and a run's."""
    def value(d, k):
        v = d.get(k)
        return str(v) if v not in (None, "") else MISSING_MEANS.get(k, "unknown")

    return [k for k in bit_fields(platform) if value(baseline, k) != value(run, k)]


def _driver_version() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def fingerprint(device) -> dict:
    """Hardware and software of this process's device; the fields a platform lacks are left out."""
    import torch

    fp = {"torch": torch.__version__, "device_type": device.type, "cpu_model": cpu_model(),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        fp.update(gpu=p.name, sm_count=p.multi_processor_count, compute_capability=f"{p.major}.{p.minor}",
                  gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                  cudnn=str(cudnn) if cudnn else None, nccl=_nccl_version(), driver=_driver_version())
    fp["platform"] = platform_key(fp.get("gpu", "cpu"), fp.get("sm_count"))
    return fp


def main(argv=None) -> int:
    import argparse

    import torch

    p = argparse.ArgumentParser(prog="python -m parity.core.fingerprint", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    determinism = apply_determinism(DETERMINISM)
    print(json.dumps({"fingerprint": fingerprint(torch.device(args.device)), "determinism": determinism}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
