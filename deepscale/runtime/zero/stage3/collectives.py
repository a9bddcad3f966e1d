"""Stateless collectives over flat buffers, and the runner that adds the sequence check.

The functions take tensors and a process group and keep no state, so the parameter group
decides *what* travels and the coordinator *when*; :class:`CollectiveRunner` only wraps them
with the sequence check (``sequence_check.py``) and labels them for the collective watchdog
(``deepscale/comm/watchdog.py``), which watches every wait. All-gathers and reduce-scatters use
two process groups over the same ranks (see the Note in ``coordinator.py``). On gloo a large
all-gather is one broadcast per owner and a reduce-scatter one reduce per owner instead of the
fused collectives, which gloo runs several times slower on large buffers; the reasons and
figures are in ``runtime/zero/collectives.py``.
"""
from typing import Callable, List, Optional

import torch

from deepscale import comm as dist
from deepscale.runtime.zero import collectives as owner_collectives
from deepscale.runtime.zero.stage3.sequence_check import CollectiveInfo, SequenceChecker

# On gloo, all-gathers of at most this many elements use one fused all-gather (latency-bound:
# one collective instead of one per owner); larger ones one broadcast per owner (bandwidth:
# 2.1M fp32 elements on 2 ranks take 13 ms fused, 6 ms as two broadcasts).
FUSED_GATHER_MAX_NUMEL = 1 << 18
# On gloo, a multi-parameter group whose parameters average at least this many elements is
# gathered by one broadcast per parameter and owner straight into place: the per-broadcast
# latency is small next to the transfer, and the staging copy it avoids is not (on a 2.1M
# group, copying out twice per step cost 9 ms of CPU per step). Smaller parameters (the
# persistent group of biases and norms) go through one collective and a copy.
DIRECT_GATHER_MIN_AVG_NUMEL = 1 << 17


def all_gather_flat(output: torch.Tensor, shard: torch.Tensor, group=None, async_op: bool = True):
    """Gather equal-sized ``shard`` of every rank into ``output`` (rank-major); returns the work handle."""
    return dist.all_gather_into_tensor(output, shard, group=group, async_op=async_op)


def reduce_scatter_flat(output: torch.Tensor, flat: torch.Tensor, group=None, async_op: bool = True):
    """Sum ``flat`` (rank-major, ``world_size`` equal chunks) over ranks; rank r receives chunk r."""
    return dist.reduce_scatter_tensor(output, flat, group=group, async_op=async_op)


class _Done:
    """The handle of a collective that needed no communication (world size 1)."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _OwnerWork:
    """The handles of per-owner broadcasts/reduces, waited on together."""

    def __init__(self, handles: List):
        self.handles = handles

    def wait(self) -> bool:
        for handle in self.handles:
            handle.wait()
        return True

    def is_completed(self) -> bool:
        return all(h.is_completed() for h in self.handles)


def _uses_owner_collectives(group) -> bool:
    try:
        return str(dist.get_backend(group)).lower() == "gloo"
    except (RuntimeError, ValueError, AttributeError):
        return False


def twin_group(group, world_size: int):
    """A second process group over the ranks of ``group`` (None: the default group), so that two
    streams of collectives (gathers, reduces) can interleave differently on different ranks.

    Every rank of the job must call it, in the same order: ``new_group`` is collective over the
    world, so the rank lists of all such groups are exchanged first and all are created, each
    rank keeping its own.
    """
    if world_size == 1 or not dist.is_initialized():
        return group
    import torch.distributed as torch_dist
    mine = tuple(torch_dist.get_process_group_ranks(group)) if group is not None else tuple(
        range(dist.get_world_size()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    twin = None
    for ranks in sorted(set(everyone)):
        created = dist.new_group(ranks=list(ranks))
        if ranks == mine:
            twin = created
    return twin


class CollectiveRunner:
    """Issues the ZeRO-3 collectives of one data-parallel group.

    Args:
        group: the process group of the all-gathers (None: the default group).
        world_size: ranks in ``group``.
        reduce_group: the process group of the reduce-scatters. Default ``group``.
        check_reduces: also sequence-check every reduce-scatter (debug mode). Default False.
    """

    def __init__(self, group, world_size: int, reduce_group=None, check_reduces: bool = False):
        self.group, self.world_size = group, world_size
        self.reduce_group = reduce_group if reduce_group is not None else group
        self.checker = SequenceChecker(group, world_size)
        self.reduce_checker = SequenceChecker(self.reduce_group, world_size) if check_reduces else None
        self.step = 0
        self.num_all_gathers = 0
        self.num_reduce_scatters = 0
        self.per_owner = world_size > 1 and _uses_owner_collectives(group)
        self.rank = dist.get_rank(group) if world_size > 1 else 0

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, info: CollectiveInfo):
        """Start gathering every rank's ``shard`` into ``output`` (rank-major); returns the handle."""
        info.step = self.step
        self.checker.check(info)
        self.num_all_gathers += 1
        if self.world_size == 1:
            output.copy_(shard)
            return _Done()
        with dist.collective_label(info.label):
            if self.per_owner and output.numel() > FUSED_GATHER_MAX_NUMEL:
                numel = shard.numel()
                output[self.rank * numel:(self.rank + 1) * numel].copy_(shard)
                return _OwnerWork(owner_collectives.all_gather_flat(output, self.rank, self.world_size, self.group,
                                                                    "broadcast"))
            return all_gather_flat(output, shard, self.group, async_op=True)

    def gather_pieces(self, full: torch.Tensor, shard: torch.Tensor, offsets, chunks, info: CollectiveInfo):
        """All-gather a multi-parameter group straight into its full layout (gloo, large parameters).

        Parameter ``i`` is ``chunks[i]`` elements at ``offsets[i]`` of ``shard`` and occupies
        ``full[offsets[i] * world : (offsets[i] + chunks[i]) * world]``, owner by owner: one
        broadcast per parameter and owner fills it in place, so no staging buffer is needed.
        """
        info.step = self.step
        self.checker.check(info)
        self.num_all_gathers += 1
        world, rank, handles = self.world_size, self.rank, []
        with dist.collective_label(info.label):
            for offset, chunk in zip(offsets, chunks):
                base = offset * world
                full[base + rank * chunk:base + (rank + 1) * chunk].copy_(shard[offset:offset + chunk])
                for owner in range(world):
                    piece = full[base + owner * chunk:base + (owner + 1) * chunk]
                    handles.append(dist.broadcast(piece, src=owner_collectives.global_rank(self.group, owner),
                                                  group=self.group, async_op=True))
        return _OwnerWork(handles)

    def gathers_in_place(self, numel: int, num_params: int) -> bool:
        """Whether a multi-parameter group of ``numel`` elements is gathered by :meth:`gather_pieces`."""
        return self.per_owner and numel >= DIRECT_GATHER_MIN_AVG_NUMEL * num_params

    def reduce_scatter(self, flat: torch.Tensor, info: CollectiveInfo,
                       make_output: Callable[[], torch.Tensor]):
        """Start summing ``flat`` (rank-major rows) over ranks. Returns ``(work, result)``: after
        ``work.wait()``, ``result`` holds this rank's summed row. ``make_output`` supplies the
        result tensor when the collective needs a separate one (per-owner reduces leave the
        result in place, in ``flat``)."""
        info.step = self.step
        if self.reduce_checker is not None:
            self.reduce_checker.check(info)
        self.num_reduce_scatters += 1
        if self.world_size == 1:
            return _Done(), flat
        with dist.collective_label(info.label):
            if self.per_owner:
                handles, own = owner_collectives.reduce_scatter_flat(flat, self.rank, self.world_size,
                                                                     self.reduce_group, "reduce")
                return _OwnerWork(handles), own
            output = make_output()
            return reduce_scatter_flat(output, flat, self.reduce_group, async_op=True), output

    def check_boundary(self, kind: str, last_module: str, token: int = 0) -> None:
        """Check that every rank reaches the same phase boundary (``end_forward``,
        ``end_backward``) next, with the same ``token`` (a digest of what the phase did)."""
        self.checker.check(CollectiveInfo(kind, -1, last_module or "<none>", "", token, self.step))
