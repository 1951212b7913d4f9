"""Which SDPA backend can run where: a valid case whose backend has no kernel on the chosen device is
rejected up front (BackendError), naming the file and the key."""

from __future__ import annotations

from parity.case.schema import DTYPES, BackendError, Case, Setup
from parity.case.trainer import BUILTIN

# Which SDPA backend has a kernel for which compute dtype, per device. CPU, as the torch 2.13 CPU
# build runs them (tests/test_gpu_trust.py tries each one): math and flash in every dtype, no
# efficient or cuDNN kernel. CUDA: flash and cuDNN need 16-bit inputs; efficient has no float64.
ATTENTION_DTYPES = {
    "cpu": {"math": DTYPES, "flash": DTYPES},
    "cuda": {"math": DTYPES, "flash": ("bfloat16",), "efficient": ("float32", "bfloat16"), "cudnn": ("bfloat16",)},
}


def attention_problem(case: Case, setup: Setup, device: str) -> str | None:
    """Why the setup's SDPA backend cannot run on the device (None if it can)."""
    if setup.trainer != BUILTIN:
        return None  # another training stack chooses its own kernels
    kernels = ATTENTION_DTYPES[device]
    backend, dtype = setup.train.attention, setup.compute_dtype
    if backend not in kernels:
        return f"{backend!r} has no {device} kernel; allowed on {device}: {', '.join(kernels)}"
    if dtype not in kernels[backend]:
        fits = [b for b, dtypes in kernels.items() if dtype in dtypes]
        return (f"{backend!r} cannot run in {dtype} on {device} (it needs {' or '.join(kernels[backend])}); "
                f"allowed in {dtype}: {', '.join(fits)}")
    if device == "cuda" and backend == "cudnn" and case.determinism["deterministic_algorithms"]:
        return ("'cudnn' has no deterministic backward, so strict determinism disables it; allowed: math, flash, "
                "efficient, or relax it with [determinism] deterministic_algorithms = false")
    return None


def check_attention(case: Case, device: str) -> None:
    """Reject up front, naming the file and key, a backend the device or dtype has no kernel for."""
    for s in case.setups:
        problem = attention_problem(case, s, device)
        if problem:
            raise BackendError(f"{case.path}: setups.{s.name}.attention: {problem}")
