"""A setup's peak memory on this rank: the CUDA allocator's peak on a GPU, the process's peak
resident set (VmHWM) on the host.

Several setups run one after another in one process, so the peak is reset at each setup's start.
On the host that means returning the previous setup's freed memory to the kernel first (a
collection for its reference cycles, then glibc's malloc_trim: freed heap pages otherwise stay
resident) and then resetting VmHWM to the current resident set (Linux: "5" written to
/proc/self/clear_refs). The host peak counts everything resident in the process: the interpreter
and torch's libraries, communication buffers and whatever the setup allocates.

glibc's mmap threshold is also pinned here, at 16 MiB: by default glibc raises it (up to 32 MiB)
each time a large block is freed, after which freed tensors of up to 32 MiB stay in the heap,
resident, and the peak measures the allocator's caching more than the setup. Pinning lower
measures less caching but maps and faults in every tensor above it anew, which slows the steps
(the measurements behind 16 MiB: docs/measured.md, "Choices in the rank code").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def measure(device: torch.device) -> str | None:
    """What this rank's peak counts, or None where it cannot be measured (a host without Linux's /proc)."""
    if device.type == "cuda":
        return "cuda_max_allocated"
    return "host_rss" if _CLEAR_REFS.exists() and _STATUS.exists() else None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 16 * 1024 * 1024  # see above: what the peak counts against how fast steps run


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif measure(device) is not None:
        libc = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc) if libc else None
        if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):  # glibc only
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            libc.malloc_trim(0)
        _CLEAR_REFS.write_text("5")


def peak_bytes(device: torch.device) -> int | None:
    """The peak since reset_peak, in bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if measure(device) is None:
        return None
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{_STATUS} has no VmHWM line")

