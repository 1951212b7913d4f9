"""What makes two machines' bits comparable: the platform key, the fingerprint, the fields that differ.

A rank records its fingerprint into run.json (parity.rank.train; an external trainer's run records
the host's); the host side (baselines) names a baseline file by platform key and decides whether a
baseline was made on a machine whose bits are comparable. torch is imported inside the functions
that need it, so this module imports cheaply. The determinism settings live in parity.core.determinism.

    python -m parity.core.fingerprint [--device cpu|cuda]    prints this machine's fingerprint as JSON
"""

from __future__ import annotations

import json
import os
import re
import subprocess

from parity.core.determinism import DETERMINISM, apply_determinism

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
