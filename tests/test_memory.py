"""The host peak memory a setup records: reset at the setup's start, so an earlier setup's peak in
the same process does not count, and a later allocation does."""

import pytest
import torch

from parity.rank import memory

CPU = torch.device("cpu")
MB = 1 << 20


@pytest.mark.skipif(memory.measure(CPU) is None, reason="the host peak needs Linux's /proc")
def test_the_peak_is_reset_and_then_sees_a_new_allocation():
    big = torch.ones(400 * MB // 4)  # an earlier setup's peak, touched so it is resident
    del big
    memory.reset_peak(CPU)
    start = memory.peak_bytes(CPU)
    small = torch.ones(100 * MB // 4)
    after = memory.peak_bytes(CPU)
    del small
    assert 90 * MB <= after - start < 300 * MB, (start, after)  # this allocation counts, the 400 MB before do not
    memory.reset_peak(CPU)
    assert memory.peak_bytes(CPU) < after - 50 * MB  # freed and given back: the next setup starts low
