"""A parameter group: the parameters that are all-gathered and reduce-scattered together.

Note: the group layout. The group's shard is the concatenation of its parameters' shards
(``p.ds_tensor`` become views into ``shard_flat``), ``S`` elements in all. One all-gather
of ``shard_flat`` returns ``world_size`` rows of ``S`` elements, rank-major; parameter ``p``
with shard offset ``o`` and shard length ``c`` is the column block ``[:, o:o+c]`` of those rows,
read row by row. A one-parameter group's rows are the padded parameter itself, so it is gathered
straight into the full buffer; otherwise each parameter's column block is copied out into its
own padded region of the full buffer (one copy per parameter). Gradients travel the opposite
way: each gradient is copied into its column block of a rank-major buffer, one reduce-scatter sums the rows and
leaves this rank's ``S`` elements, aligned with ``shard_flat``. This is the same split PyTorch
FSDP2 uses (``foreach_all_gather`` copy-out, ``foreach_reduce`` copy-in).

Note: one full buffer per group, released in place. Autograd saves views of the gathered
weights for backward (``linear`` saves ``weight.t()``). If every gather made a new buffer,
those saved views would keep every gathered buffer of the forward alive until backward: the
whole model, gathered, per rank (measured: +300 MiB on the 23M GPT). So the group keeps one
full buffer for its lifetime (``buffers.py``); :meth:`ParamGroup.release` gives its memory back
and the next gather (the one before backward) fills it again, so the saved views see the
values again without holding memory in between (PyTorch FSDP2 does the same with storage
resizing). The pre-backward hooks on module outputs make the refill happen before a saved view
is read. The all-gather staging buffer of a multi-parameter group and the reduce-scatter input
are kept per group the same way, so the hot path allocates nothing.

Note: one collective per group, then a copy. A multi-parameter group is gathered rank-major
into the staging buffer by one collective (on gloo: one broadcast per owner row for large
groups, see ``collectives.py``) and copied out parameter by parameter. Gathering each
parameter's column block straight into place instead needs one broadcast per parameter and
owner: on gloo each costs a fixed latency, which for groups of small parameters (the
persistent group of biases and norms, re-gathered after every step) made up most of ZeRO-3's
fixed per-step cost (34 broadcasts of a 30K-element group: 5.6 ms, one all-gather: 0.5 ms).
For groups of large parameters on gloo the balance turns: the copy-out costs more CPU than the
broadcasts' latency, so they are still gathered straight into place
(``CollectiveRunner.gathers_in_place``).
"""
from typing import List, Optional, Sequence

import torch

from deepscale.runtime.zero.stage3.buffers import ReleasableBuffer
from deepscale.runtime.zero.stage3.collectives import CollectiveRunner
from deepscale.runtime.zero.stage3.sequence_check import CollectiveInfo
from deepscale.runtime.zero.stage3.states import ShardState, ZeroParamStatus, shard_state_machine
from deepscale.runtime.zero.stage3.zero_param import empty_like_param

_MAX_NAMES_SHOWN = 4


def _short_list(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_NAMES_SHOWN else "")


class ParamGroup:
    """Parameters gathered and reduced together (see the module Note).

    Args:
        index: position of the group (same on every rank).
        params: partitioned parameters (same dtype and device), in layout order.
        names: their names, for messages.
        module_names: names of the modules that own them, for messages.
        runner: issues the collectives.
        persistent: gathered once and kept (``stage3_param_persistence_threshold``).
    """

    def __init__(self, index: int, params: List[torch.nn.Parameter], names: List[str], module_names: List[str],
                 runner: CollectiveRunner, persistent: bool = False):
        if not params:
            raise ValueError("a parameter group needs at least one parameter")
        self.index, self.params, self.names = index, params, names
        self.module_names = module_names
        self.runner, self.persistent = runner, persistent
        self.world_size = runner.world_size
        self.chunks = [p.ds_tensor.numel() for p in params]
        self.offsets = [sum(self.chunks[:i]) for i in range(len(params))]
        self.shard_numel = sum(self.chunks)
        self.numel = sum(p.ds_numel for p in params)
        self.dtype, self.device = params[0].ds_tensor.dtype, params[0].ds_tensor.device
        if len(params) == 1:
            self.shard_flat = params[0].ds_tensor
        else:
            self.shard_flat = torch.cat([p.ds_tensor.to(self.dtype) for p in params])
        self._point_shards()
        for param in params:
            param._ds_group = self
            param.ds_persist = persistent
        self.state = shard_state_machine(f"parameter group {index} ({_short_list(module_names)})")
        self.users = 0
        self.reported: set = set()
        self.backward_done = False
        self._work, self._gathered = None, None
        # world size > 1: the full values, the all-gather staging (several parameters) and the
        # reduce-scatter input; created on first use, memory released while not needed
        self._full: Optional[ReleasableBuffer] = None
        self._staging: Optional[ReleasableBuffer] = None
        self._reduce_input: Optional[ReleasableBuffer] = None
        self._reduce_output: Optional[ReleasableBuffer] = None
        self._reduce_owner = None  # the ``flat`` of the reduce using the two buffers above
        self.held_for_backward = False  # stays gathered until the backward ends (see hooks.py)
        self.shard_source = None  # parameter offload keeps the shard elsewhere (runtime/offload/param_offload.py)
        modules, shown = _short_list(module_names), _short_list(names)
        self.gather_info = CollectiveInfo("all_gather", index, modules, shown, self.shard_numel)
        self.reduce_info = CollectiveInfo("reduce_scatter", index, modules, shown, self.shard_numel * self.world_size)

    def _point_shards(self) -> None:
        for param, offset, chunk in zip(self.params, self.offsets, self.chunks):
            param.ds_tensor = self.shard_flat[offset:offset + chunk]

    @torch.no_grad()
    def use_shard_storage(self, flat: torch.Tensor) -> None:
        """Keep the group's shard in ``flat`` (same values, e.g. the fp32 master range) from now on."""
        if flat.numel() != self.shard_numel or flat.dtype != self.dtype:
            raise ValueError(f"use_shard_storage: expected {self.shard_numel} elements of {self.dtype}, "
                             f"got {flat.numel()} of {flat.dtype}")
        if not self.is_sharded:
            raise RuntimeError("use_shard_storage: the group must be sharded")
        flat.copy_(self.shard_flat)
        self.shard_flat = flat
        self._point_shards()

    # --- gather / release -----------------------------------------------------------------
    @torch.no_grad()
    def start_gather(self) -> None:
        """Issue the all-gather (asynchronous); :meth:`finish_gather` makes parameters usable."""
        self.state.to(ShardState.GATHERING)
        if self.shard_source is not None:
            self.shard_source.before_gather(self)
        for param in self.params:
            param.ds_status = ZeroParamStatus.INFLIGHT
        if self.world_size == 1:
            self._work = None
            return
        numel = self.world_size * self.shard_numel
        if self._full is None:
            self._full = ReleasableBuffer(numel, self.dtype, self.device)
        full = self._full.acquire()
        if len(self.params) == 1:
            self._gathered = full  # the rows are the padded parameter: gather in place
        elif self.runner.gathers_in_place(self.numel, len(self.params)):
            self._gathered = full  # large parameters on gloo: per-owner broadcasts straight into place
            self._work = self.runner.gather_pieces(full, self.shard_flat, self.offsets, self.chunks, self.gather_info)
            return
        else:
            if self._staging is None:
                self._staging = ReleasableBuffer(numel, self.dtype, self.device)
            self._gathered = self._staging.acquire()
        self._work = self.runner.all_gather(self._gathered, self.shard_flat, self.gather_info)

    @torch.no_grad()
    def finish_gather(self) -> None:
        """Wait for the all-gather (starting it if needed) and point every ``param.data`` at its full value."""
        if self.state == ShardState.GATHERED:
            return
        if self.state == ShardState.SHARDED:
            self.start_gather()
        if self._work is not None:
            self._work.wait()  # the collective watchdog watches this wait
        self._work = None
        self._materialize()
        self.state.to(ShardState.GATHERED)
        if self.shard_source is not None:
            self.shard_source.after_gather(self)

    def _materialize(self) -> None:
        world = self.world_size
        if world == 1:
            full, stride = self.shard_flat, 1
        else:
            full, stride = self._full.tensor, world
            if self._gathered is not full:
                rows = self._gathered.view(world, self.shard_numel)
                for offset, chunk in zip(self.offsets, self.chunks):
                    full[offset * world:(offset + chunk) * world].view(world, chunk).copy_(rows[:, offset:offset + chunk])
                self._staging.release()
        self._gathered = None
        for param, offset in zip(self.params, self.offsets):
            param.data = full[offset * stride:offset * stride + param.ds_numel].view(param.ds_shape)
            param.ds_status = ZeroParamStatus.AVAILABLE

    @torch.no_grad()
    def release(self) -> None:
        """Drop the full values (waits for an all-gather still in flight first)."""
        if self.state == ShardState.SHARDED:
            return
        if self.state == ShardState.GATHERING:
            self.finish_gather()
        self.state.to(ShardState.SHARDED)
        empty = empty_like_param(self.dtype, self.device)
        for param in self.params:
            param.data = empty
            param.ds_status = ZeroParamStatus.NOT_AVAILABLE
        if self._full is not None:
            self._full.release()  # see the module Note: autograd's saved views stay valid
        if self.shard_source is not None:
            self.shard_source.after_release(self)

    @property
    def is_sharded(self) -> bool:
        return self.state == ShardState.SHARDED

    @property
    def is_gathered(self) -> bool:
        return self.state == ShardState.GATHERED

    # --- gradients ------------------------------------------------------------------------
    @torch.no_grad()
    def start_reduce(self, comm_dtype: torch.dtype, trainable: Sequence[torch.nn.Parameter]):
        """Copy the gradients of ``trainable`` into the rank-major buffer and issue the
        reduce-scatter; clears their ``.grad``. Returns ``(work, output, flat)``: once ``work``
        is waited on, ``output`` holds the summed gradients aligned with ``shard_flat``; pass
        ``flat`` to :meth:`finish_reduce` after consuming ``output``."""
        world = self.world_size
        single = len(self.params) == 1 and trainable
        grad = trainable[0].grad if single else None
        if (single and grad is not None and grad.dtype == comm_dtype and grad.is_contiguous()
                and grad.numel() == world * self.shard_numel):
            flat = grad.reshape(-1)
        else:
            flat = self._reduce_buffer("_reduce_input", world * self.shard_numel, comm_dtype, self._reduce_busy)
            rows = flat.view(world, self.shard_numel)
            grads = {id(p): p.grad for p in trainable if p.grad is not None}
            # every element is written once: a gradient, or zeros (padding, no gradient)
            for param, offset, chunk in zip(self.params, self.offsets, self.chunks):
                grad = grads.get(id(param))
                _copy_into_rows(rows, grad.reshape(-1) if grad is not None else None, offset, chunk)
        for param in trainable:
            param.grad = None
        busy = self._reduce_busy
        work, output = self.runner.reduce_scatter(
            flat, self.reduce_info, lambda: self._reduce_buffer("_reduce_output", self.shard_numel, comm_dtype, busy))
        if not busy:
            self._reduce_owner = flat
        return work, output, flat

    @property
    def _reduce_busy(self) -> bool:
        return self._reduce_owner is not None

    def _reduce_buffer(self, attr: str, numel: int, dtype: torch.dtype, busy: bool) -> torch.Tensor:
        # A second reduce of this group while the first is in flight (reentrant activation
        # checkpointing runs several backwards) gets fresh tensors.
        if busy:
            return torch.empty(numel, dtype=dtype, device=self.device)
        buffer = getattr(self, attr)
        if buffer is None or buffer.dtype != dtype:
            buffer = ReleasableBuffer(numel, dtype, self.device)
            setattr(self, attr, buffer)
        return buffer.acquire()

    def finish_reduce(self, flat: torch.Tensor) -> None:
        """The reduce-scatter of ``flat`` was consumed: give its buffers' memory back."""
        if flat is not self._reduce_owner:
            return  # it used fresh tensors (issued while the buffers were busy)
        for buffer in (self._reduce_input, self._reduce_output):
            if buffer is not None:
                buffer.release()
        self._reduce_owner = None


def _copy_into_rows(rows: torch.Tensor, grad: Optional[torch.Tensor], offset: int, chunk: int) -> None:
    """Write the flat ``grad`` as consecutive rows of length ``chunk`` into column block ``offset``
    and zero the rest of the block (all of it when ``grad`` is None)."""
    block = rows[:, offset:offset + chunk]
    numel = 0 if grad is None else grad.numel()
    full_rows, rest = divmod(numel, chunk)
    if full_rows:
        block[:full_rows].copy_(grad[:full_rows * chunk].view(full_rows, chunk))
    if rest:
        block[full_rows, :rest].copy_(grad[full_rows * chunk:])
        block[full_rows, rest:].zero_()
        full_rows += 1
    if full_rows < block.shape[0]:
        block[full_rows:].zero_()


def find_group(param) -> Optional[ParamGroup]:
    """The group a partitioned parameter belongs to, or None."""
    return getattr(param, "_ds_group", None)
