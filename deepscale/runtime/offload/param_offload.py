"""Parameter offload at ZeRO stage 3 (``zero_optimization.offload_param``): the executor.

Note: where a shard lives. Every non-persistent parameter group keeps its shard (this rank's
1/N of each of its parameters) in an offload store: host memory (``device: cpu``) or an NVMe
swap file (``device: nvme``). The group's own shard tensor (``shard_flat``, which the
parameters' ``ds_tensor`` views point into) becomes a :class:`ReleasableBuffer` whose memory is
given back while the shard is not needed, so the module's storage holds nothing between uses.
Before a gather the shard is loaded into it (``before_gather``); once the all-gather has
completed it is released again (``after_gather``). Every rank thus reads only its own 1/N and
the full parameter is all-gathered from the ranks (ZeRO-Infinity's bandwidth-centric
partitioning, Rajbhandari et al. 2021, section 6.1). Writers of a shard (the optimizer's
publish after a step, ``load_state_dict``, ``safe_set_full_fp32_param``,
``GatheredParameters(modifier_rank=...)``) go through :meth:`ParamOffload.publish` or
:meth:`ParamOffload.resident`, which write the store back. Persistent groups (small parameters
gathered once and kept) are not offloaded.

Note: read-ahead. NVMe reads follow the plan of ``param_prefetch_plan.py``: the order in which
groups were loaded is recorded per phase (forward, backward) and the next pass issues reads
``buffer_count`` uses ahead, so disk reads overlap the compute and the all-gathers of the groups
before them. When the model takes another path the executor stops following the plan for the
rest of the phase (loads then read on demand) and records the new order.

Note: failures on one rank. A full disk fails one rank's write while the others go on into the
next collective and would wait forever. Writes are therefore flushed at points every rank
reaches together (after the initial swap-out, after each publish) and the ranks agree there on
whether any failed; all of them raise the same error, naming the failing ranks.
"""
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from deepscale import comm as dist
from deepscale.runtime.offload.param_prefetch_plan import SwapInPlan, plan_swap_ins
from deepscale.runtime.offload.param_stores import HostShardStore, NvmeShardStore
from deepscale.runtime.offload.param_swap_file import ParamSwapDirectory
from deepscale.utils.logging import logger


@dataclass
class ParamOffloadSettings:
    """``zero_optimization.offload_param`` with the ``aio`` section, validated.

    Args:
        device: ``"cpu"`` or ``"nvme"``.
        nvme_path: swap directory root (``nvme`` only).
        pin_memory: page-lock host buffers (falls back to pageable with one warning).
        buffer_count: NVMe staging buffers (reads in flight at once).
        buffer_size: elements per staging buffer; no group's shard may be larger.
        max_in_cpu: with ``nvme``, shard elements kept in host memory instead (the first
            groups in model order).
        aio: :class:`~deepscale.ops.aio.AsyncIOHandle` keyword arguments.
        debug: verify a checksum of every swap file read.
    """

    device: str
    nvme_path: Optional[str] = None
    pin_memory: bool = False
    buffer_count: int = 5
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    aio: dict = field(default_factory=dict)
    debug: bool = False

    def __post_init__(self):
        if self.device not in ("cpu", "nvme"):
            raise ValueError(f"zero_optimization.offload_param.device must be 'none', 'cpu' or 'nvme', got "
                             f"{self.device!r}")
        if self.device == "nvme":
            if not self.nvme_path:
                raise ValueError("zero_optimization.offload_param.device='nvme' needs offload_param.nvme_path")
            if self.buffer_count < 1:
                raise ValueError(f"zero_optimization.offload_param.buffer_count must be at least 1 with "
                                 f"device='nvme', got {self.buffer_count}")
            if self.buffer_size < 1:
                raise ValueError(f"zero_optimization.offload_param.buffer_size must be at least 1 with "
                                 f"device='nvme', got {self.buffer_size}")

    def max_group_numel(self, world_size: int) -> Optional[int]:
        """The largest group (whole elements) whose shard fits one staging buffer, or None."""
        return self.buffer_size * world_size if self.device == "nvme" else None


def param_offload_settings(config) -> Optional[ParamOffloadSettings]:
    """The settings from a parsed config, or None when parameters are not offloaded."""
    section = config.zero_optimization.offload_param
    if section is None or str(section.device) == "none":
        return None
    aio = config.aio
    aio_kwargs = dict(block_size=int(aio.block_size), queue_depth=int(aio.queue_depth),
                      thread_count=int(aio.thread_count or aio.intra_op_parallelism),
                      single_submit=bool(aio.single_submit), overlap_events=bool(aio.overlap_events))
    return ParamOffloadSettings(device=str(section.device), nvme_path=section.nvme_path,
                                pin_memory=bool(section.pin_memory), buffer_count=int(section.buffer_count),
                                buffer_size=int(section.buffer_size), max_in_cpu=int(section.max_in_cpu),
                                aio=aio_kwargs,
                                debug=bool(getattr(config.zero_optimization, "debug_sequence_check", False)))


class ParamOffload:
    """Keeps the shards of stage-3 parameter groups in an offload store (see the module Notes).

    Args:
        settings: :class:`ParamOffloadSettings`.
        groups: the model's parameter groups (persistent ones stay as they are).
        dp_group: the data-parallel process group (for agreeing on errors).
        world_size: ranks in ``dp_group``.
        debug: also verify swap-file checksums. Default False.
    """

    def __init__(self, settings: ParamOffloadSettings, groups: Sequence, dp_group, world_size: int,
                 debug: bool = False):
        self.settings, self.dp_group, self.world_size = settings, dp_group, int(world_size)
        self.groups = {g.index: g for g in groups if not g.persistent}
        self.device = next((g.device for g in self.groups.values()), torch.device("cpu"))
        self._check_sizes()
        self.host = HostShardStore(settings.pin_memory)
        self.nvme: Optional[NvmeShardStore] = None
        self._store: Dict[int, object] = {}
        self._assign_stores(debug or settings.debug)
        self._buffers: Dict[int, object] = {}  # index -> ReleasableBuffer
        self._resident: set = set()
        self._open: Dict[int, bool] = {}  # groups open for writes -> loaded by open_for_write
        self._plans: Dict[str, SwapInPlan] = {}
        self._phase: Optional[str] = None
        self._prepared: Optional[str] = None
        self._recorded: List[int] = []
        self._cursor, self._on_track = 0, False
        self.num_loads = 0
        self._move_shards_out()

    # --- construction ---------------------------------------------------------------------
    def _check_sizes(self) -> None:
        if self.settings.device != "nvme":
            return
        for group in self.groups.values():
            if group.shard_numel > self.settings.buffer_size:
                raise ValueError(
                    f"zero_optimization.offload_param.buffer_size={self.settings.buffer_size} elements is too small: "
                    f"the parameters of {group.module_names[:3]} ({group.names[:3]}) are gathered together and their "
                    f"shards on this rank hold {group.shard_numel} elements; set buffer_size >= {group.shard_numel}")

    def _assign_stores(self, debug: bool) -> None:
        kept = 0
        on_nvme = []
        for index in sorted(self.groups):
            group = self.groups[index]
            if self.settings.device == "cpu" or kept + group.shard_numel <= self.settings.max_in_cpu:
                self._store[index] = self.host
                kept += group.shard_numel if self.settings.device == "nvme" else 0
            else:
                on_nvme.append(group)
        if not on_nvme:
            if self.settings.device == "nvme":
                logger.info(f"offload_param: every shard ({kept} elements) fits offload_param.max_in_cpu="
                            f"{self.settings.max_in_cpu} and stays in host memory; nothing is swapped to NVMe")
            return
        directory = ParamSwapDirectory(self.settings.nvme_path, dist.get_rank() if dist.is_initialized() else 0,
                                       self.settings.aio.get("block_size", 1 << 20), debug=debug)
        itemsize = on_nvme[0].shard_flat.element_size()
        slot_numel = max(directory.padded(g.shard_numel * itemsize) for g in on_nvme) // itemsize
        self.nvme = NvmeShardStore(directory, self.settings.buffer_count, slot_numel, on_nvme[0].dtype,
                                   self.settings.pin_memory, self.settings.aio)
        needed = sum(directory.padded(g.shard_numel * itemsize) for g in on_nvme)
        self._check_free_space(directory, needed)
        for group in on_nvme:
            self._store[group.index] = self.nvme
        logger.info(f"offload_param: {len(on_nvme)} parameter groups ({needed / 2**20:.1f} MiB) swap to "
                    f"{directory.path}, {len(self.groups) - len(on_nvme)} stay in host memory (max_in_cpu="
                    f"{self.settings.max_in_cpu})")

    def _check_free_space(self, directory: ParamSwapDirectory, needed: int) -> None:
        """Refuse (on every rank) when the ranks sharing this rank's disk need more than is free."""
        disk = (socket.gethostname(), os.stat(directory.path).st_dev)
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, (disk, needed), group=self.dp_group)
        else:
            everyone = [(disk, needed)]
        sharing = [n for d, n in everyone if d == disk]
        total, free = sum(sharing), directory.free_bytes()
        error = None
        if total > free:
            ranks = f"the {len(sharing)} ranks on this disk" if len(sharing) > 1 else "this rank"
            error = (f"the parameter swap files of {ranks} need {total / 2**20:.1f} MiB under {directory.path}, "
                     f"only {free / 2**20:.1f} MiB are free")
        self._agree(error, "checking free space for the parameter swap files")

    @torch.no_grad()
    def _move_shards_out(self) -> None:
        # imported here: the stage-3 package imports this module (its optimizer builds the offload)
        from deepscale.runtime.zero.stage3.buffers import ReleasableBuffer
        for index, group in self.groups.items():
            buffer = ReleasableBuffer(group.shard_numel, group.dtype, group.device)
            group.use_shard_storage(buffer.acquire())  # copies the values; the old shard is freed
            self._buffers[index] = buffer
            self._store[index].put(index, buffer.tensor)
            buffer.release()
            group.shard_source = self
        self._flush("writing the parameter swap files")

    # --- errors agreed by every rank ------------------------------------------------------
    def _flush(self, what: str) -> None:
        error = self.nvme.flush() if self.nvme is not None else None
        self._agree(error, what)

    def _agree(self, error: Optional[str], what: str) -> None:
        """Raise the same error on every rank when ``error`` is set on any (a collective)."""
        if self.world_size > 1:
            flag = torch.tensor([1.0 if error else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dp_group)
            if flag.item() == 0:
                return
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, error, group=self.dp_group)
            failed = {rank: msg for rank, msg in enumerate(everyone) if msg}
        elif error:
            failed = {0: error}
        else:
            return
        listed = "; ".join(f"rank {rank}: {msg}" for rank, msg in failed.items())
        hint = ""
        if self.settings.device == "nvme":
            hint = (f". Free space under zero_optimization.offload_param.nvme_path={self.settings.nvme_path!r} or "
                    f"point it at a larger disk")
        raise RuntimeError(f"offload_param: {what} failed on {len(failed)} rank(s): {listed}{hint}")

    # --- the hooks of ParamGroup ----------------------------------------------------------
    @torch.no_grad()
    def before_gather(self, group) -> None:
        """Load ``group``'s shard into its shard buffer (its all-gather reads it next)."""
        index = group.index
        if index not in self.groups:
            return
        follows_plan = self._advance(index)
        self._load(index)
        if follows_plan:
            self._issue(self._plans[self._phase].issue[self._cursor])

    def after_gather(self, group) -> None:
        """The all-gather completed: the shard buffer is not needed (at one rank the full
        parameters are the shard itself, so it stays until the release)."""
        if self.world_size > 1:
            self._evict(group.index)

    def after_release(self, group) -> None:
        self._evict(group.index)

    def _load(self, index: int) -> None:
        if index in self._resident:
            return
        dest = self._buffers[index].acquire()
        self._store[index].load(index, dest)
        self._resident.add(index)
        self.num_loads += 1

    def _evict(self, index: int) -> None:
        if index in self._resident:
            self._buffers[index].release()
            self._resident.discard(index)

    @contextmanager
    def resident(self, group, write: bool):
        """While active the shard of ``group`` is loaded; with ``write`` it is stored back on
        exit (every rank must do the same: errors are agreed)."""
        index = group.index
        if index not in self.groups:
            yield
            return
        loaded_here = index not in self._resident
        self._load(index)
        try:
            yield
        finally:
            if write:
                self._store[index].put(index, self._buffers[index].tensor)
            if loaded_here:
                self._evict(index)
        if write:
            self._flush("writing a parameter shard")

    @torch.no_grad()
    def publish(self, params: Sequence[torch.nn.Parameter], sources: Sequence[torch.Tensor]) -> None:
        """Copy ``sources`` (the fp32 masters) into the shards of ``params`` and store them."""
        by_group: Dict[int, list] = {}
        for param, src in zip(params, sources):
            by_group.setdefault(param._ds_group.index, []).append((param, src))
        for index, pairs in sorted(by_group.items()):
            group = pairs[0][0]._ds_group
            self.open_for_write(group, overwrite=len(pairs) == len(group.params))
            torch._foreach_copy_([p.ds_tensor for p, _ in pairs], [s for _, s in pairs])
        self.close_writes()

    @torch.no_grad()
    def open_for_write(self, group, overwrite: bool = False) -> None:
        """Load ``group``'s shard so that writes through its parameters' ``ds_tensor`` land;
        :meth:`close_writes` stores every group opened. At most ``buffer_count`` groups stay
        open: opening another stores the oldest first (a later write to it opens it again).

        Args:
            group: the parameter group.
            overwrite: every element will be written: skip reading the old shard.
        """
        index = group.index
        if index not in self.groups or index in self._open:
            return
        if len(self._open) >= max(1, self.settings.buffer_count):
            self._store_back(next(iter(self._open)))
        loaded_here = index not in self._resident
        if loaded_here and overwrite:
            self._buffers[index].acquire().zero_()  # zeros in the padding
            self._resident.add(index)
        else:
            self._load(index)
        self._open[index] = loaded_here

    def _store_back(self, index: int) -> None:
        loaded_here = self._open.pop(index)
        self._store[index].put(index, self._buffers[index].tensor)
        if loaded_here:
            self._evict(index)

    def close_writes(self) -> None:
        """Store every group opened by :meth:`open_for_write` (a collective: errors are agreed)."""
        for index in list(self._open):
            self._store_back(index)
        self._flush("writing the updated parameter shards")

    # --- read-ahead -----------------------------------------------------------------------
    def _advance(self, index: int) -> bool:
        """Record a load during a phase; True when it is the next use the plan expects."""
        if self._phase is None or self._store.get(index) is not self.nvme:
            return False
        self._recorded.append(index)
        plan = self._plans.get(self._phase)
        if self._on_track and plan is not None and self._cursor < len(plan.order) and plan.order[self._cursor] == index:
            self._cursor += 1
            return True
        self._on_track = False
        return False

    def _issue(self, reads) -> None:
        for index in reads:
            self.nvme.start_read(index)

    def prepare_phase(self, name: str) -> None:
        """Issue the first reads of phase ``name`` ahead of it (e.g. backward's, when forward ends)."""
        plan = self._plans.get(name)
        if self.nvme is None or plan is None:
            return
        self.nvme.drop_reads()
        self._issue(plan.issue[0])
        self._prepared = name

    def begin_phase(self, name: str) -> None:
        """A phase (``"forward"``, ``"backward"``) begins: follow its plan, record its loads."""
        if self.nvme is None:
            return
        if self._phase is not None:
            self.end_phase()
        plan = self._plans.get(name)
        if self._prepared != name:
            self.nvme.drop_reads()
            if plan is not None:
                self._issue(plan.issue[0])
        self._prepared = None
        self._phase, self._recorded, self._cursor, self._on_track = name, [], 0, plan is not None

    def end_phase(self) -> None:
        """The phase ended: plan its next pass from the loads just recorded."""
        if self.nvme is None or self._phase is None:
            return
        self._plans[self._phase] = plan_swap_ins(self._recorded, self.settings.buffer_count)
        self._phase = None

    def plan(self, name: str) -> Optional[SwapInPlan]:
        """The current read-ahead plan of phase ``name`` (None before its first pass)."""
        return self._plans.get(name)

    # --- figures and teardown -------------------------------------------------------------
    def stats(self) -> dict:
        """Bytes in each store and moved so far."""
        out = {"device": self.settings.device, "groups": len(self.groups), "host_bytes": self.host.nbytes(),
               "loads": self.num_loads}
        if self.nvme is not None:
            out.update(nvme_groups=sum(1 for s in self._store.values() if s is self.nvme),
                       nvme_bytes_read=self.nvme.bytes_read, nvme_bytes_written=self.nvme.bytes_written,
                       loads_read_ahead=self.nvme.loads_read_ahead, loads_on_demand=self.nvme.loads_on_demand,
                       load_wait_s=self.nvme.load_wait_s,
                       swap_dir=self.nvme.dir.path)
        return out

    def close(self) -> None:
        """Remove the swap files (the NVMe shards are lost: call after training)."""
        if self.nvme is not None:
            self.nvme.close()

