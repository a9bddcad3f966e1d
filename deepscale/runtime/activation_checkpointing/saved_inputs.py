"""How a checkpoint keeps its inputs until the recomputation: whole, in host memory, split
across the model-parallel group, and/or in preallocated contiguous slots.

Note: partitioning. With a model-parallel group of size ``m`` every rank computes the same
layer input (tensor-parallel layers end with an all-reduce), so each rank keeps only its
``1/m`` piece of the flattened input (padded to a multiple of ``m``) and the recomputation
all-gathers the pieces back. This is the "partitioned activation checkpointing" of ZeRO-R
(Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", section 6.1). Every rank of the group must run the same checkpoints in the same order,
as it already must for the tensor-parallel collectives.
"""
from typing import Dict, Optional, Tuple

import torch

from deepscale import comm as dist
from deepscale.runtime.activation_checkpointing.settings import CheckpointSettings, note_once, state


def _mp_group_and_size(settings: CheckpointSettings) -> Tuple[Optional[object], int]:
    mpu = settings.mpu
    if mpu is None:
        return None, 1
    size = mpu.get_model_parallel_world_size() if hasattr(mpu, "get_model_parallel_world_size") else None
    if not size or size <= 1:
        return None, 1
    return mpu.get_model_parallel_group(), int(size)


class ContiguousSlots:
    """``num_checkpoints`` preallocated rows per (input position, dtype, device, numel).

    Checkpoint call ``i`` of a forward writes row ``i % num_checkpoints``. A write bumps the
    row's generation, so a recomputation that finds its row overwritten (more checkpoint calls
    than rows before the backward) raises instead of silently using another layer's input.
    """

    def __init__(self, num_checkpoints: int):
        self.num_checkpoints = num_checkpoints
        self.calls = 0
        self._buffers: Dict[tuple, torch.Tensor] = {}
        self._generation: Dict[tuple, int] = {}

    def next_call(self) -> int:
        """The slot index of a new checkpoint call."""
        slot = self.calls % self.num_checkpoints
        self.calls += 1
        return slot

    def store(self, slot: int, position: int, flat: torch.Tensor):
        key = (position, flat.dtype, flat.device, flat.numel())
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty(self.num_checkpoints, flat.numel(), dtype=flat.dtype, device=flat.device)
            self._buffers[key] = buffer
        buffer[slot].copy_(flat)
        generation = self._generation.get((key, slot), 0) + 1
        self._generation[(key, slot)] = generation
        return buffer[slot], (key, slot, generation)

    def check(self, token) -> None:
        key, slot, generation = token
        if self._generation.get((key, slot)) != generation:
            raise RuntimeError(
                "activation checkpointing: a saved input kept in contiguous memory was overwritten before its "
                f"recomputation: more than activation_checkpointing.number_checkpoints={self.num_checkpoints} "
                "checkpoint calls ran before the backward. Raise number_checkpoints to the number of checkpoint "
                "calls per forward, or set contiguous_memory_optimization to false")


class SavedInput:
    """One tensor input kept for recomputation (its value only; detached)."""

    __slots__ = ("data", "shape", "device", "requires_grad", "partitioned", "token", "group", "size")

    def restore(self) -> torch.Tensor:
        """The full input on its original device, detached, with the original ``requires_grad``."""
        if self.token is not None:
            state().slots.check(self.token)
        data = self.data.to(self.device)
        if self.partitioned:
            pieces = [torch.empty_like(data) for _ in range(self.size)]
            dist.all_gather(pieces, data.contiguous(), group=self.group)
            data = torch.cat(pieces)[:self.shape.numel()]
        return data.view(self.shape).detach().requires_grad_(self.requires_grad)


def _partition_piece(flat: torch.Tensor, group, size: int) -> torch.Tensor:
    chunk = -(-flat.numel() // size)
    rank = dist.get_rank(group)
    piece = torch.zeros(chunk, dtype=flat.dtype, device=flat.device)
    begin, end = min(flat.numel(), rank * chunk), min(flat.numel(), (rank + 1) * chunk)
    piece[:end - begin].copy_(flat[begin:end])
    return piece


def save_input(tensor: torch.Tensor, position: int, slot: Optional[int], settings: CheckpointSettings) -> SavedInput:
    """Keep ``tensor`` for a recomputation as the settings ask.

    Args:
        tensor: the input.
        position: its index among the checkpoint's tensor inputs (names a contiguous buffer).
        slot: the contiguous slot of this checkpoint call, or None when contiguous mode is off.
        settings: the current settings.
    """
    saved = SavedInput()
    saved.shape, saved.device = tensor.shape, tensor.device
    saved.requires_grad = tensor.requires_grad
    saved.token = None
    group, size = (None, 1)
    if settings.partition_activations:
        group, size = _mp_group_and_size(settings)
        if size == 1:
            note_once("partition_noop", "activation_checkpointing.partition_activations is on but there is no "
                      "model-parallel group of more than one rank (mpu is None or its world size is 1): saved "
                      "inputs are kept whole")
    saved.partitioned, saved.group, saved.size = size > 1 and tensor.is_floating_point(), group, size
    data = tensor.detach()
    if saved.partitioned:
        data = _partition_piece(data.reshape(-1), group, size)
    if settings.checkpoint_in_cpu and data.device.type != "cpu":
        data = data.to("cpu")
    if slot is not None:
        data, saved.token = state().slots.store(slot, position, data.reshape(-1))
    saved.data = data
    return saved
