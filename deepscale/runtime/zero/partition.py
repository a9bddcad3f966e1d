"""Partition math for ZeRO stages 1 and 2: buckets, padding and each rank's chunk.

Note: the bucket-partitioned layout. The trainable parameters of each optimizer param group
are cut into buckets of about ``reduce_bucket_size`` elements, taken in reverse registration
order (roughly the order backward produces gradients). A bucket is one flat buffer holding its
parameters back to back, padded so its length is a multiple of ``world_size * align``. The
bucket is split into ``world_size`` equal chunks and rank ``r`` owns chunk ``r`` of every
bucket: the fp32 master weights, optimizer states and (stage 2) reduced gradients of that
chunk live only on rank ``r``. Because each bucket is split evenly, a bucket's gradient
reduce-scatter and its parameter all-gather are single collectives over equal-sized pieces,
and every rank holds ``1/world_size`` of each group up to the padding. A parameter lies in
exactly one bucket, so its intersection with a rank's chunk is at most one contiguous range
(a "fragment"); fragments are what checkpoints store, so they load at any other layout.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

# Elements per chunk are a multiple of this, so every chunk of a 2-byte buffer starts on an
# 8-byte boundary.
DEFAULT_ALIGN = 4


def padded_numel(numel: int, world_size: int, align: int = DEFAULT_ALIGN) -> int:
    """Smallest multiple of ``world_size * align`` that holds ``numel`` elements (at least one unit)."""
    if world_size < 1 or align < 1:
        raise ValueError(f"world_size and align must be positive, got {world_size} and {align}")
    unit = world_size * align
    return max(unit, -(-numel // unit) * unit)


def split_into_buckets(numels: Sequence[int], bucket_numel: int) -> List[List[int]]:
    """Group consecutive items into buckets; a bucket is closed once it reaches ``bucket_numel``.

    Args:
        numels: element counts, in the order they should be packed.
        bucket_numel: target elements per bucket (a single larger item gets its own bucket).

    Returns:
        lists of indices into ``numels``, in order.
    """
    if bucket_numel < 1:
        raise ValueError(f"reduce_bucket_size must be a positive number of elements, got {bucket_numel}")
    buckets, current, size = [], [], 0
    for index, numel in enumerate(numels):
        current.append(index)
        size += numel
        if size >= bucket_numel:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def intersect(start: int, length: int, other_start: int, other_length: int) -> Optional[Tuple[int, int]]:
    """Overlap of ``[start, start+length)`` and ``[other_start, other_start+other_length)`` as
    ``(begin, end)``, or None when they do not overlap."""
    begin, end = max(start, other_start), min(start + length, other_start + other_length)
    return (begin, end) if begin < end else None


@dataclass
class Fragment:
    """The part of one parameter inside one rank's chunk of a bucket.

    Attributes:
        param_start: first element of the fragment in the flattened parameter.
        chunk_offset: where that element sits inside the chunk.
        numel: fragment length.
    """

    param_start: int
    chunk_offset: int
    numel: int


@dataclass
class BucketPlan:
    """Layout of one bucket.

    Attributes:
        index: launch order of the bucket (same on every rank).
        group_index: optimizer param group the bucket belongs to.
        param_indices: indices of the bucket's parameters in the group's trainable list.
        offsets: start of each parameter inside the bucket's flat buffer.
        numels: element count of each parameter.
        padded: flat length including padding (a multiple of ``world_size * align``).
        chunk: elements per rank (``padded // world_size``).
    """

    index: int
    group_index: int
    param_indices: List[int]
    offsets: List[int]
    numels: List[int]
    padded: int
    chunk: int
    fragments: List[List[Optional[Fragment]]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def fragment(self, rank: int, position: int) -> Optional[Fragment]:
        """The fragment of the bucket's ``position``-th parameter owned by ``rank``, or None."""
        return self.fragments[rank][position]


def _fragments_for(offsets: List[int], numels: List[int], chunk: int, world_size: int):
    table = []
    for rank in range(world_size):
        row = []
        for offset, numel in zip(offsets, numels):
            overlap = intersect(offset, numel, rank * chunk, chunk)
            row.append(None if overlap is None else
                       Fragment(overlap[0] - offset, overlap[0] - rank * chunk, overlap[1] - overlap[0]))
        table.append(row)
    return table


def plan_group_buckets(group_index: int, numels: Sequence[int], bucket_numel: int, world_size: int,
                       align: int = DEFAULT_ALIGN) -> List[BucketPlan]:
    """Buckets of one param group; parameters are packed in reverse order (see the module Note).

    Args:
        group_index: index of the param group.
        numels: element count of each trainable parameter of the group, in group order.
        bucket_numel: target bucket size in elements (``reduce_bucket_size``).
        world_size: number of data-parallel ranks sharing each bucket.
        align: chunk lengths are a multiple of this. Default ``DEFAULT_ALIGN``.

    Returns:
        the group's buckets; ``index`` is provisional (see :func:`order_buckets`).
    """
    order = list(reversed(range(len(numels))))
    plans = []
    for members in split_into_buckets([numels[i] for i in order], bucket_numel):
        indices = [order[m] for m in members]
        sizes = [numels[i] for i in indices]
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        padded = padded_numel(sum(sizes), world_size, align)
        chunk = padded // world_size
        plans.append(BucketPlan(-1, group_index, indices, offsets, sizes, padded, chunk,
                                _fragments_for(offsets, sizes, chunk, world_size)))
    return plans


def order_buckets(plans: List[BucketPlan], completion_keys: Sequence[float]) -> List[BucketPlan]:
    """Sort buckets by when backward is expected to finish them and number them in that order.

    Args:
        plans: buckets of all groups.
        completion_keys: one sortable key per plan, smaller means finished earlier.
    """
    ordered = [plans[i] for i in sorted(range(len(plans)), key=lambda i: completion_keys[i])]
    for index, plan in enumerate(ordered):
        plan.index = index
    return ordered


def padding_elements(plans: Sequence[BucketPlan]) -> int:
    """Total padding elements over all buckets (the overhead over an exact ``1/N`` split)."""
    return sum(plan.padded - plan.numel for plan in plans)
