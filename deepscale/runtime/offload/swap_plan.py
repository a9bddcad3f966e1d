"""The NVMe swap plan of an optimizer step, as data (DESIGN.md "Plans are data").

Note: the walk. With the optimizer on NVMe, the fp32 masters and optimizer states of this rank's
partition are split into sub-groups of at most ``sub_group_size`` elements
(:func:`split_sub_groups`). A step walks them in order: each sub-group is read into a host
buffer, updated, and written back (ZeRO-Infinity, Rajbhandari et al. 2021, section 6). With
``pipeline_read`` the next sub-group's read runs while the current one is updated (read-ahead),
with ``pipeline_write`` the previous write completes in the background (write-behind); each
needs a spare buffer, so ``buffer_count`` 3 gives full overlap, 2 one of the two, 1 none.
:func:`swap_schedule` turns these settings into the exact list of actions the executor runs
(``nvme_step.py``), and :func:`check_schedule` proves a schedule safe (every update after its
read, no buffer reused before its write completed); both run without files or processes.
"""
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Sequence

READ, WAIT_READ, UPDATE, WRITE, WAIT_WRITE = "read", "wait_read", "update", "write", "wait_write"


@dataclass(frozen=True)
class SubGroup:
    """A contiguous range ``[start, start + numel)`` of master ``slab`` updated as one unit."""

    index: int
    slab: int
    start: int
    numel: int


@dataclass(frozen=True)
class SwapAction:
    """One step of the walk: ``kind`` (read, wait_read, update, write, wait_write) of ``sub_group`` in ``buffer``."""

    kind: str
    sub_group: int
    buffer: int


def split_sub_groups(slab_numels: Sequence[int], sub_group_size: int) -> List[SubGroup]:
    """Cut every master (slab) into sub-groups of at most ``sub_group_size`` elements, in order."""
    if sub_group_size < 1:
        raise ValueError(f"sub_group_size must be >= 1, got {sub_group_size}")
    out = []
    for slab, numel in enumerate(slab_numels):
        for start in range(0, int(numel), sub_group_size):
            out.append(SubGroup(len(out), slab, start, min(sub_group_size, int(numel) - start)))
    return out


def swap_schedule(num_sub_groups: int, buffer_count: int, pipeline_read: bool = False,
                  pipeline_write: bool = False) -> List[SwapAction]:
    """The actions of one step over ``num_sub_groups`` sub-groups (see the module Note).

    Args:
        num_sub_groups: sub-groups to walk, in index order.
        buffer_count: host buffers available (>= 1).
        pipeline_read: start the next read before updating the current sub-group.
        pipeline_write: let writes complete in the background until their buffer is needed.
    """
    if buffer_count < 1:
        raise ValueError(f"buffer_count must be >= 1, got {buffer_count}")
    actions: List[SwapAction] = []
    free = deque(range(buffer_count))
    writing = deque()  # (sub-group, buffer) written, not yet waited
    buffer_of: Dict[int, int] = {}

    def acquire() -> int:
        if not free:
            done, buf = writing.popleft()
            actions.append(SwapAction(WAIT_WRITE, done, buf))
            free.append(buf)
        return free.popleft()

    def read(index: int, buf: int) -> None:
        buffer_of[index] = buf
        actions.append(SwapAction(READ, index, buf))

    for index in range(num_sub_groups):
        if index not in buffer_of:
            read(index, acquire())
        buf = buffer_of[index]
        actions.append(SwapAction(WAIT_READ, index, buf))
        if pipeline_read and index + 1 < num_sub_groups:
            # A write older than the previous sub-group's has had a whole update to finish: wait
            # for it rather than give up the read-ahead (the previous write keeps overlapping).
            if not free and len(writing) > 1:
                done, done_buf = writing.popleft()
                actions.append(SwapAction(WAIT_WRITE, done, done_buf))
                free.append(done_buf)
            if free:
                read(index + 1, free.popleft())
        actions.append(SwapAction(UPDATE, index, buf))
        actions.append(SwapAction(WRITE, index, buf))
        writing.append((index, buf))
        if not pipeline_write:
            done, done_buf = writing.popleft()
            actions.append(SwapAction(WAIT_WRITE, done, done_buf))
            free.append(done_buf)
    while writing:
        done, buf = writing.popleft()
        actions.append(SwapAction(WAIT_WRITE, done, buf))
    return actions


def check_schedule(actions: Sequence[SwapAction], num_sub_groups: int) -> Dict[str, int]:
    """Check a schedule is safe and complete; return its overlap counts.

    Raises ``AssertionError`` naming the first violation. Returns ``{"overlapped_reads": ...,
    "overlapped_writes": ..., "max_buffers_in_use": ...}``: reads in flight during another
    sub-group's update, writes in flight during another's update, and the buffer high-water mark.
    """
    owner: Dict[int, int] = {}  # buffer -> sub-group holding it
    state: Dict[int, str] = {}
    overlapped_reads = overlapped_writes = peak = 0
    for action in actions:
        index, buf, kind = action.sub_group, action.buffer, action.kind
        if kind == READ:
            assert buf not in owner, f"buffer {buf} reused for sub-group {index} while {owner.get(buf)} holds it"
            assert index not in state, f"sub-group {index} read twice"
            owner[buf], state[index] = index, READ
        else:
            assert owner.get(buf) == index, f"{kind} of sub-group {index} in buffer {buf} it does not hold"
            expected = {WAIT_READ: READ, UPDATE: WAIT_READ, WRITE: UPDATE, WAIT_WRITE: WRITE}[kind]
            assert state.get(index) == expected, f"{kind} of sub-group {index} after {state.get(index)}"
            state[index] = kind
            if kind == UPDATE:
                overlapped_reads += sum(1 for i, s in state.items() if i != index and s == READ)
                overlapped_writes += sum(1 for i, s in state.items() if i != index and s == WRITE)
            if kind == WAIT_WRITE:
                del owner[buf]
        peak = max(peak, len(owner))
    done = [i for i, s in state.items() if s == WAIT_WRITE]
    assert len(done) == num_sub_groups and not owner, f"{num_sub_groups - len(done)} sub-group(s) not completed"
    return {"overlapped_reads": overlapped_reads, "overlapped_writes": overlapped_writes, "max_buffers_in_use": peak}
