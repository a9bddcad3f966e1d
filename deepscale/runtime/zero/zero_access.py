"""Whole-tensor views of partitioned state, behind ``deepscale.utils.safe_get_full_*``.

Every managed parameter carries ``_deepscale_full_access``, an object with ``get_full_fp32``,
``get_full_grad``, ``get_full_optimizer_state`` and the ``set_full_*`` counterparts; the
helpers in ``deepscale/utils/tensor_fragment.py`` only dispatch to it, so ``utils`` needs no
runtime import. Getting a full tensor of a partitioned parameter is a collective: every rank
of the data-parallel group must call it for the same parameter.
"""
from typing import Optional

import torch

from deepscale import comm as dist


class FullTensorAccess:
    """Assembles and scatters whole tensors for a :class:`ZeroOptimizer`."""

    def __init__(self, zero_optimizer):
        self._opt = zero_optimizer

    def _locate(self, param):
        bucket, position = self._opt.grads.location(param)
        index = self._opt.buckets.index(bucket)
        return bucket, bucket.plan.fragment(bucket.rank, position), self._opt.masters[index]

    def _assemble(self, param, source_chunk: Optional[torch.Tensor]) -> torch.Tensor:
        bucket, frag, _ = self._locate(param)
        full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        if frag is not None and source_chunk is not None:
            full[frag.param_start:frag.param_start + frag.numel].copy_(
                source_chunk[frag.chunk_offset:frag.chunk_offset + frag.numel])
        if bucket.world_size > 1:
            # Fragments do not overlap, so a sum assembles them exactly.
            dist.all_reduce(full, group=bucket.group)
        return full.view(param.shape)

    def _scatter(self, param, value: torch.Tensor, dest_chunk: torch.Tensor) -> None:
        _, frag, _ = self._locate(param)
        if frag is not None:
            flat = value.detach().reshape(-1).to(device=dest_chunk.device, dtype=dest_chunk.dtype)
            dest_chunk[frag.chunk_offset:frag.chunk_offset + frag.numel].copy_(
                flat[frag.param_start:frag.param_start + frag.numel])

    @torch.no_grad()
    def get_full_fp32(self, param) -> torch.Tensor:
        return self._assemble(param, self._locate(param)[2].detach())

    @torch.no_grad()
    def get_full_grad(self, param) -> torch.Tensor:
        bucket = self._locate(param)[0]
        return self._assemble(param, bucket.own_grad)

    @torch.no_grad()
    def get_full_optimizer_state(self, param, key: str) -> Optional[torch.Tensor]:
        bucket, _, master = self._locate(param)
        value = self._opt.basic.state.get(master, {}).get(key)
        if value is not None and not (torch.is_tensor(value) and value.shape == master.shape):
            return value  # a per-group scalar such as Adam's step
        exists = torch.tensor([float(value is not None)])
        if bucket.world_size > 1:
            dist.all_reduce(exists, group=bucket.group)
        if float(exists) == 0:
            return None
        return self._assemble(param, value.detach() if value is not None else None)

    @torch.no_grad()
    def set_full_fp32(self, param, value: torch.Tensor) -> None:
        self._scatter(param, value, self._locate(param)[2].detach())
        param.data.copy_(value.reshape(param.shape).to(param.dtype))

    @torch.no_grad()
    def set_full_grad(self, param, value: torch.Tensor) -> None:
        self._scatter(param, value, self._locate(param)[0].own_grad)

    @torch.no_grad()
    def set_full_optimizer_state(self, param, key: str, value: torch.Tensor) -> None:
        master = self._locate(param)[2]
        state = self._opt.basic.state.setdefault(master, {})
        if key not in state:
            state[key] = torch.zeros_like(master.detach())
        self._scatter(param, value, state[key])


class WholeTensorAccess:
    """The same face for stage 0, where every rank holds whole tensors.

    Args:
        master_of: parameter -> the tensor the optimizer updates (fp32 master or the param).
        grad_of: parameter -> its averaged gradient (the reducer's view).
        optimizer: the torch optimizer.
    """

    def __init__(self, master_of, grad_of, optimizer):
        self._master_of, self._grad_of, self._optimizer = master_of, grad_of, optimizer

    def get_full_fp32(self, param) -> torch.Tensor:
        return self._master_of(param).detach().float().clone()

    def get_full_grad(self, param) -> torch.Tensor:
        return self._grad_of(param).detach().float().clone()

    def get_full_optimizer_state(self, param, key: str):
        value = self._optimizer.state.get(self._master_of(param), {}).get(key)
        return value.detach().clone() if torch.is_tensor(value) else value

    @torch.no_grad()
    def set_full_fp32(self, param, value: torch.Tensor) -> None:
        self._master_of(param).copy_(value.reshape(param.shape))
        param.data.copy_(value.reshape(param.shape).to(param.dtype))

    @torch.no_grad()
    def set_full_grad(self, param, value: torch.Tensor) -> None:
        self._grad_of(param).copy_(value.reshape(param.shape))

    @torch.no_grad()
    def set_full_optimizer_state(self, param, key: str, value: torch.Tensor) -> None:
        master = self._master_of(param)
        state = self._optimizer.state.setdefault(master, {})
        if key not in state:
            state[key] = torch.zeros_like(master.detach())
        state[key].copy_(value.reshape(master.shape))
