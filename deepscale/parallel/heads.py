"""Which attention heads each tensor-parallel rank keeps (pure functions, no process groups).

Note: head plans. With grouped-query attention every key/value head serves ``g = heads / kv_heads``
query heads, and Hugging Face attention repeats each local key/value head ``num_key_value_groups``
times, so a rank's query heads must be whole groups of its own key/value heads:

* ``kv_heads >= tp``: the key/value heads are split into contiguous runs (unequal runs when tp
  does not divide them) and each rank keeps the query heads of its run.
* ``kv_heads < tp``: each key/value head is shared by ``tp / kv_heads`` ranks (tp must be a
  multiple of kv_heads), which split its ``g`` query heads between them (unequally when needed);
  every rank keeps that one key/value head (a replica, whose gradient is summed over the group).

Anything else (fewer query heads than ranks, tp not a multiple of kv_heads below it) cannot be
split and raises ``ValueError`` naming the module.
"""
from dataclasses import dataclass
from typing import List

from deepscale.parallel.mappings import even_sizes


@dataclass(frozen=True)
class HeadShard:
    """One rank's heads: query head ids, key/value head ids, and whether key/value heads are replicas."""

    q_heads: List[int]
    kv_heads: List[int]
    kv_replicated: bool

    @property
    def groups(self) -> int:
        """Query heads per local key/value head (``num_key_value_groups`` on this rank)."""
        return len(self.q_heads) // len(self.kv_heads)


def plan_heads(num_heads: int, num_kv_heads: int, tp_size: int, where: str = "attention") -> List[HeadShard]:
    """Every rank's :class:`HeadShard` for ``num_heads`` query and ``num_kv_heads`` key/value heads.

    Raises:
        ValueError: the heads cannot be split over ``tp_size`` ranks (the message names ``where``).
    """
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{where}: {num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        plans, start = [], 0
        for count in even_sizes(num_kv_heads, tp_size):
            kv = list(range(start, start + count))
            plans.append(HeadShard([h for k in kv for h in range(k * group, (k + 1) * group)], kv, False))
            start += count
        return plans
    if tp_size % num_kv_heads:
        raise ValueError(f"{where}: cannot split {num_kv_heads} key/value heads over tensor-parallel size {tp_size}: "
                         f"with fewer key/value heads than ranks the size must be a multiple of them")
    share = tp_size // num_kv_heads
    if group < share:
        raise ValueError(f"{where}: cannot split {num_heads} query heads over tensor-parallel size {tp_size}: each "
                         f"key/value head's {group} query heads would be split over {share} ranks")
    plans = []
    for kv in range(num_kv_heads):
        start = kv * group
        for count in even_sizes(group, share):
            plans.append(HeadShard(list(range(start, start + count)), [kv], share > 1))
            start += count
    return plans


def head_rows(heads: List[int], head_dim: int, offset: int = 0, stride: int = 0) -> List[int]:
    """Row ids of ``heads`` in a projection whose head ``h`` occupies rows
    ``offset + h * (stride or head_dim) ... + head_dim``."""
    step = stride or head_dim
    return [offset + h * step + i for h in heads for i in range(head_dim)]
