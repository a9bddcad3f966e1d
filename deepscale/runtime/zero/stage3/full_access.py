"""Whole-tensor access for ZeRO stage 3, behind ``deepscale.utils.safe_get_full_*``.

Each rank holds one padded piece of every parameter: ``length`` elements at ``offset`` in
an fp32 master (and in the flat gradient and optimizer states aligned with it), covering
elements ``[rank * length, (rank + 1) * length)`` of the flattened parameter. A getter
all-gathers the pieces (a collective: every rank of the data-parallel group calls it for the
same parameter); a setter keeps only this rank's piece of the full value it is given.
"""
from typing import Optional

import torch

from deepscale import comm as dist
from deepscale.runtime.zero.stage3.zero_param import shard_access, shard_range


class Stage3TensorAccess:
    """The ``_deepscale_full_access`` of parameters managed by a :class:`Stage3Optimizer`."""

    def __init__(self, optimizer):
        self._opt = optimizer

    def _slot(self, param):
        index, offset, length = self._opt._slots[id(param)]
        return self._opt._masters[index], index, offset, length

    def _gather(self, param, piece: torch.Tensor) -> torch.Tensor:
        """The full tensor (param's shape, fp32) from every rank's padded ``piece``."""
        piece = piece.detach().float().contiguous()
        world = param.ds_world_size  # expert parameters: their expert-data-parallel group
        if world == 1:
            full = piece.clone()
        else:
            full = torch.empty(world * piece.numel(), dtype=piece.dtype, device=piece.device)
            dist.all_gather_into_tensor(full, piece, group=param.ds_process_group)
        return full[:param.ds_numel].view(param.ds_shape)

    def _keep_piece(self, param, value: torch.Tensor, dest: torch.Tensor) -> None:
        if value.numel() != param.ds_numel:
            raise ValueError(f"expected a full value of {param.ds_numel} elements (shape {tuple(param.ds_shape)}), "
                             f"got {value.numel()}")
        begin, end = shard_range(param.ds_numel, param.ds_rank, param.ds_world_size)
        flat = value.detach().reshape(-1).to(device=dest.device, dtype=dest.dtype)
        dest[:end - begin].copy_(flat[begin:end])

    @torch.no_grad()
    def get_full_fp32(self, param) -> torch.Tensor:
        master, _, offset, length = self._slot(param)
        return self._gather(param, master[offset:offset + length])

    @torch.no_grad()
    def get_full_grad(self, param) -> torch.Tensor:
        _, index, offset, length = self._slot(param)
        return self._gather(param, self._opt._master_grads[index][offset:offset + length])

    @torch.no_grad()
    def get_full_optimizer_state(self, param, key: str) -> Optional[torch.Tensor]:
        master, _, offset, length = self._slot(param)
        value = self._opt.basic.state.get(master, {}).get(key)
        if value is None:
            return None
        if not (torch.is_tensor(value) and value.shape == master.shape):
            return value  # a per-group scalar such as Adam's step
        return self._gather(param, value[offset:offset + length])

    @torch.no_grad()
    def set_full_fp32(self, param, value: torch.Tensor) -> None:
        master, _, offset, length = self._slot(param)
        self._keep_piece(param, value, master.detach()[offset:offset + length])
        with shard_access(param, write=True):
            self._keep_piece(param, value, param.ds_tensor)
        if param.data.numel() == param.ds_numel:  # gathered right now: keep the full copy current
            param.data.copy_(value.reshape(param.ds_shape).to(param.dtype))

    @torch.no_grad()
    def set_full_grad(self, param, value: torch.Tensor) -> None:
        _, index, offset, length = self._slot(param)
        self._keep_piece(param, value, self._opt._master_grads[index][offset:offset + length])

    @torch.no_grad()
    def set_full_optimizer_state(self, param, key: str, value: torch.Tensor) -> None:
        master, _, offset, length = self._slot(param)
        state = self._opt.basic.state.setdefault(master, {})
        if key not in state:
            state[key] = torch.zeros_like(master.detach())
        self._keep_piece(param, value, state[key][offset:offset + length])
