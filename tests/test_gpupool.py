"""The GPU pool xdist workers share: a case gets all the GPUs it needs, or waits; none is handed out twice."""

import threading
import time

import pytest

from parity.run.gpupool import GpuPool, pool_dir, visible_gpu_ids


def workers(tmp_path, n=2, ids=("0", "1", "2", "3", "4", "5", "6", "7")):
    """n pools on one directory: what n xdist workers each build (locks on separate open files conflict)."""
    return [GpuPool(tmp_path / "pool", list(ids)) for _ in range(n)]


def test_two_workers_never_share_a_gpu(tmp_path):
    a, b = workers(tmp_path)
    with a.acquire(4) as first, b.acquire(4) as second:
        assert len(first) == len(second) == 4 and not set(first) & set(second)
        assert a.try_acquire(1) is None and b.try_acquire(1) is None  # all 8 are taken


def test_an_8_gpu_case_waits_for_all_8_then_runs_on_8(tmp_path):
    """The bug this replaces: 2 workers on 8 GPUs each saw 4, so every 8-rank case ran on CPU."""
    a, b = workers(tmp_path)
    got, released = [], threading.Event()

    def small_case():
        with a.acquire(1):
            released.wait(5)

    t = threading.Thread(target=small_case)
    t.start()
    time.sleep(0.2)
    assert b.try_acquire(8) is None  # one GPU busy: the 8-GPU case cannot start yet
    waits = []
    threading.Timer(0.5, released.set).start()
    with b.acquire(8, poll_s=0.05, on_wait=waits.append) as ids:
        got = ids
    t.join()
    assert sorted(got) == [str(i) for i in range(8)] and waits  # it waited, then got all 8


def test_a_failed_try_holds_nothing(tmp_path):
    a, b = workers(tmp_path, ids=("0", "1"))
    with a.acquire(1) as one:
        assert b.try_acquire(2) is None
        held = b.try_acquire(1)  # the GPU the failed try touched was given back
        assert held is not None and list(held) != one


def test_asking_more_than_the_pool_is_an_error(tmp_path):
    (a,) = workers(tmp_path, n=1, ids=("0",))
    with pytest.raises(ValueError, match="2 GPUs asked of a pool of 1"):
        with a.acquire(2):
            pass


def test_visible_ids_and_pool_dir(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,")
    assert visible_gpu_ids() == ["2", "5"]
    assert pool_dir("abc").name == "parity-gpus-abc"
