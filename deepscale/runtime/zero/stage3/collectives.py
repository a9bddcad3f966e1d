"""Stateless collectives over flat buffers, and the runner that adds the debug check and watchdog.

The functions take tensors and a process group and keep no state, so the parameter group
decides *what* travels and the coordinator *when*; :class:`CollectiveRunner` only wraps them
with the optional sequence check (``sequence_check.py``) and registers every wait with the
watchdog (``watchdog.py``). On gloo the runner uses one broadcast (all-gather) or one reduce
(reduce-scatter) per owner instead of the fused collectives, which gloo runs several times
slower; the reasons and figures are in ``runtime/zero/collectives.py``.
"""
from typing import Callable, List, Optional

import torch

from deepscale import comm as dist
from deepscale.runtime.zero import collectives as owner_collectives
from deepscale.runtime.zero.stage3.sequence_check import CollectiveInfo, SequenceChecker
from deepscale.runtime.zero.stage3.watchdog import Watchdog


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


class CollectiveRunner:
    """Issues the ZeRO-3 collectives of one data-parallel group.

    Args:
        group: the process group (None: the default group).
        world_size: ranks in ``group``.
        debug: run the sequence check before every collective.
        watchdog: the watchdog every wait registers with, or None.
    """

    def __init__(self, group, world_size: int, debug: bool = False, watchdog: Optional[Watchdog] = None):
        self.group, self.world_size = group, world_size
        self.checker = SequenceChecker(group, world_size) if debug else None
        self.watchdog = watchdog
        self.step = 0
        self.num_all_gathers = 0
        self.num_reduce_scatters = 0
        self.per_owner = world_size > 1 and _uses_owner_collectives(group)
        self.rank = dist.get_rank(group) if world_size > 1 else 0

    def _before(self, info: CollectiveInfo) -> None:
        info.step = self.step
        if self.checker is not None:
            self.checker.check(info)

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, info: CollectiveInfo):
        self._before(info)
        self.num_all_gathers += 1
        if self.world_size == 1:
            output.copy_(shard)
            return _Done()
        if self.per_owner:
            numel = shard.numel()
            output[self.rank * numel:(self.rank + 1) * numel].copy_(shard)
            return _OwnerWork(owner_collectives.all_gather_flat(output, self.rank, self.world_size, self.group,
                                                                "broadcast"))
        return all_gather_flat(output, shard, self.group, async_op=True)

    def gather_pieces(self, full: torch.Tensor, shard: torch.Tensor, offsets, chunks, info: CollectiveInfo):
        """All-gather a multi-parameter group straight into its full layout (per-owner backends).

        Parameter ``i`` is ``chunks[i]`` elements at ``offsets[i]`` of ``shard`` and occupies
        ``full[offsets[i] * world : (offsets[i] + chunks[i]) * world]``, owner by owner. One
        broadcast per parameter and owner fills it in place, so no staging buffer is needed.
        """
        self._before(info)
        self.num_all_gathers += 1
        world, rank, handles = self.world_size, self.rank, []
        for offset, chunk in zip(offsets, chunks):
            base = offset * world
            full[base + rank * chunk:base + (rank + 1) * chunk].copy_(shard[offset:offset + chunk])
            for owner in range(world):
                piece = full[base + owner * chunk:base + (owner + 1) * chunk]
                handles.append(dist.broadcast(piece, src=owner_collectives.global_rank(self.group, owner),
                                              group=self.group, async_op=True))
        return _OwnerWork(handles)

    def reduce_scatter(self, flat: torch.Tensor, info: CollectiveInfo,
                       make_output: Callable[[], torch.Tensor]):
        """Start summing ``flat`` (rank-major rows) over ranks. Returns ``(work, result)``: after
        ``work.wait()``, ``result`` holds this rank's summed row. ``make_output`` supplies the
        result tensor when the collective needs a separate one (per-owner reduces leave the
        result in place, in ``flat``)."""
        self._before(info)
        self.num_reduce_scatters += 1
        if self.world_size == 1:
            return _Done(), flat
        if self.per_owner:
            handles, own = owner_collectives.reduce_scatter_flat(flat, self.rank, self.world_size, self.group,
                                                                 "reduce")
            return _OwnerWork(handles), own
        output = make_output()
        return reduce_scatter_flat(output, flat, self.group, async_op=True), output

    def check_boundary(self, kind: str, last_module: str) -> None:
        """In debug mode, check that every rank reaches the same phase boundary (``end_forward``,
        ``end_backward``) next; a no-op otherwise."""
        if self.checker is not None:
            self._before(CollectiveInfo(kind, -1, last_module or "<none>", "", 0))

    def wait(self, work, info: CollectiveInfo) -> None:
        """Wait for ``work``; the watchdog reports the wait if it takes too long."""
        if self.watchdog is None or isinstance(work, _Done):
            work.wait()
            return
        with self.watchdog.watch(info.describe()):
            work.wait()
