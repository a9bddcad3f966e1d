"""The NVMe swap plan and the Twin-Flow split are pure values: checked without files or processes."""
import pytest

from deepscale.runtime.offload.optimizer_offload import device_slabs
from deepscale.runtime.offload.swap_plan import (READ, UPDATE, WAIT_WRITE, WRITE, SwapAction, check_schedule,
                                                 split_sub_groups, swap_schedule)


def test_split_sub_groups_cuts_each_slab_in_order():
    sgs = split_sub_groups([250, 100, 0, 301], 100)
    assert [(s.slab, s.start, s.numel) for s in sgs] == [
        (0, 0, 100), (0, 100, 100), (0, 200, 50), (1, 0, 100), (3, 0, 100), (3, 100, 100), (3, 200, 100),
        (3, 300, 1)]
    assert [s.index for s in sgs] == list(range(8))
    with pytest.raises(ValueError, match="sub_group_size"):
        split_sub_groups([10], 0)


@pytest.mark.parametrize("buffers", [1, 2, 3, 4])
@pytest.mark.parametrize("read,write", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("num", [0, 1, 2, 7])
def test_every_schedule_is_safe_and_complete(buffers, read, write, num):
    stats = check_schedule(swap_schedule(num, buffers, read, write), num)
    assert stats["max_buffers_in_use"] <= buffers


def test_overlap_follows_the_settings():
    serial = check_schedule(swap_schedule(6, 4), 6)
    assert serial["overlapped_reads"] == serial["overlapped_writes"] == 0
    assert serial["max_buffers_in_use"] == 1
    full = check_schedule(swap_schedule(6, 3, True, True), 6)
    # every update but the last overlaps the next read, every update but the first a write
    # (the last one overlaps the two writes still in flight)
    assert full["overlapped_reads"] == 5 and full["overlapped_writes"] == 6
    assert full["max_buffers_in_use"] == 3
    one = check_schedule(swap_schedule(6, 1, True, True), 6)
    assert one["overlapped_reads"] == one["overlapped_writes"] == 0  # no spare buffer: nothing can overlap
    reads_only = check_schedule(swap_schedule(6, 2, True, False), 6)
    assert reads_only["overlapped_reads"] == 5 and reads_only["overlapped_writes"] == 0


def test_first_actions_of_a_pipelined_walk():
    actions = swap_schedule(3, 3, True, True)
    assert actions[:6] == [SwapAction(READ, 0, 0), SwapAction("wait_read", 0, 0), SwapAction(READ, 1, 1),
                           SwapAction(UPDATE, 0, 0), SwapAction(WRITE, 0, 0), SwapAction("wait_read", 1, 1)]


def test_check_schedule_rejects_a_reused_buffer():
    bad = [SwapAction(READ, 0, 0), SwapAction(READ, 1, 0)]
    with pytest.raises(AssertionError, match="reused"):
        check_schedule(bad, 2)
    early = [SwapAction(READ, 0, 0), SwapAction(UPDATE, 0, 0)]
    with pytest.raises(AssertionError, match="update of sub-group 0 after read"):
        check_schedule(early, 1)
    with pytest.raises(AssertionError, match="not completed"):
        check_schedule([SwapAction(READ, 0, 0), SwapAction("wait_read", 0, 0), SwapAction(UPDATE, 0, 0),
                        SwapAction(WRITE, 0, 0)], 1)
    assert WAIT_WRITE == "wait_write"


def test_twin_flow_keeps_the_last_slabs_on_the_device():
    assert device_slabs([10, 10, 10, 10], 1.0) == [False] * 4
    assert device_slabs([10, 10, 10, 10], 0.0) == [True] * 4
    assert device_slabs([10, 10, 10, 10], 0.5) == [False, False, True, True]
    assert device_slabs([10, 30, 10], 0.7) == [False, False, True]  # 10 of 50 fit in the 30% kept
