"""The read-ahead plan of parameter swap-in: which shard reads to issue, and when (a pure value).

Note: the overlap-centric prefetcher (ZeRO-Infinity, Rajbhandari et al. 2021, section 6.2).
Stage 3 runs the same modules in the same order every step, so the sequence in which parameter
groups are gathered repeats; the executor records it once per phase (forward, backward) and
plans the next pass from it. ``buffer_count`` staging buffers are in use: a read fills one, the
group's gather empties it. The plan keeps every buffer busy with the next uses in order: at the
start of a phase the first ``buffer_count`` reads are issued, and each time a group's shard is
consumed the freed buffer takes the next use that is not already being read. A group used twice
within the window is read once per use, the second read issued after the first use consumed it.
The plan is a value: it can be printed and simulated (reads, bytes, buffers in use) without a
process, and the executor (``param_offload.py``) only follows it.
"""
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple


@dataclass(frozen=True)
class SwapInPlan:
    """Reads to issue around each use of a recorded sequence.

    Attributes:
        order: the group indices in the order their shards are consumed.
        issue: ``issue[0]`` is issued when the phase begins; ``issue[k]`` (k >= 1) right after
            ``order[k - 1]`` was consumed. ``issue[len(order)]`` is always empty.
        buffer_count: staging buffers the plan may fill at once.
    """

    order: Tuple[int, ...]
    issue: Tuple[Tuple[int, ...], ...]
    buffer_count: int

    def describe(self) -> str:
        """One line per use: the group consumed and the reads issued right after."""
        lines = [f"start: read {list(self.issue[0])}"]
        for k, group in enumerate(self.order):
            lines.append(f"{k:4d}: consume group {group}; read {list(self.issue[k + 1])}")
        return "\n".join(lines)


def plan_swap_ins(order: Sequence[int], buffer_count: int) -> SwapInPlan:
    """The plan for consuming ``order`` with ``buffer_count`` staging buffers (see the module Note).

    Args:
        order: group indices in consumption order (recorded from the previous pass).
        buffer_count: ``offload_param.buffer_count`` (at least 1).
    """
    if buffer_count < 1:
        raise ValueError(f"buffer_count must be at least 1, got {buffer_count}")
    order = tuple(int(g) for g in order)
    issue, held, cursor = [], [], 0

    def fill() -> Tuple[int, ...]:
        nonlocal cursor
        batch = []
        while cursor < len(order) and len(held) < buffer_count and order[cursor] not in held:
            batch.append(order[cursor])
            held.append(order[cursor])
            cursor += 1
        return tuple(batch)

    issue.append(fill())
    for group in order:
        held.remove(group)  # invariant: the reads held are those of the next uses, distinct
        issue.append(fill())
    return SwapInPlan(order, tuple(issue), int(buffer_count))


def simulate(plan: SwapInPlan, shard_nbytes: Dict[int, int]) -> Dict[str, int]:
    """Replay ``plan``: reads issued, bytes read, the most buffers filled at once, and whether
    every use found its read issued before it (``ready_uses``).

    Args:
        plan: a :class:`SwapInPlan`.
        shard_nbytes: group index -> bytes of its shard (as read from its swap file).
    """
    held, peak, reads, nbytes, ready = [], 0, 0, 0, 0

    def issue(batch) -> None:
        nonlocal peak, reads, nbytes
        for group in batch:
            held.append(group)
            reads += 1
            nbytes += shard_nbytes[group]
        peak = max(peak, len(held))

    issue(plan.issue[0])
    for k, group in enumerate(plan.order):
        if group in held:
            ready += 1
            held.remove(group)
        issue(plan.issue[k + 1])
    return {"reads": reads, "bytes_read": nbytes, "peak_buffers": peak, "ready_uses": ready, "uses": len(plan.order)}
