"""A pool of GPU ids shared by the pytest-xdist workers of one session.

Each GPU id is a lock file in a directory named after the session (xdist's testrunuid). A worker
takes all the GPUs its case needs at once, under the pool's own lock so two workers never hold
half of what each needs, or waits until enough are free, and gives them back when the case ends.
flock locks belong to the open file, so they die with a crashed worker and never strand a GPU.
Standard library only: the pytest plugin imports this in every session.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def visible_gpu_ids() -> list[str]:
    """The GPU ids this process may use, without initialising CUDA (pytest workers must not)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()]
    gpus = Path("/proc/driver/nvidia/gpus")  # one entry per GPU
    return [str(i) for i in range(len(list(gpus.iterdir())))] if gpus.is_dir() else []


def pool_dir(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"parity-gpus-{run_id}"


class GpuPool:
    def __init__(self, directory: Path, ids: list[str]):
        self.dir = Path(directory)
        self.ids = list(ids)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _lock(self, name: str, blocking: bool) -> int | None:
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def try_acquire(self, n: int) -> dict[str, int] | None:
        """{gpu id: lock fd} for n free GPUs, or None (and nothing held) if fewer are free."""
        pool = self._lock("pool.lock", blocking=True)
        try:
            held: dict[str, int] = {}
            for gid in self.ids:
                fd = self._lock(f"gpu{gid}.lock", blocking=False)
                if fd is not None:
                    held[gid] = fd
                    if len(held) == n:
                        return held
            for fd in held.values():
                self._unlock(fd)
            return None
        finally:
            self._unlock(pool)

    @contextmanager
    def acquire(self, n: int, poll_s: float = 0.5, on_wait=None):
        """Yields the ids of n GPUs held for the duration; waits while fewer are free."""
        if n > len(self.ids):
            raise ValueError(f"{n} GPUs asked of a pool of {len(self.ids)}")
        start = time.monotonic()
        while (held := self.try_acquire(n)) is None:
            if on_wait:
                on_wait(time.monotonic() - start)
            time.sleep(poll_s)
        try:
            yield list(held)
        finally:
            for fd in held.values():
                self._unlock(fd)
