"""Differentiable all-to-all with uneven splits, the token exchange of expert parallelism.

gloo implements ``all_to_all_single`` with uneven split sizes on CPU (checked with torch 2.13),
so no send/recv emulation is needed; NCCL does too. The backward of an exchange is the reverse
exchange (the split sizes swap roles).
"""
from typing import List, Optional

import torch

from deepscale import comm as dist


def _exchange(input: torch.Tensor, send_splits: List[int], recv_splits: List[int], group) -> torch.Tensor:
    input = input.contiguous()
    output = input.new_empty((sum(recv_splits),) + tuple(input.shape[1:]))
    dist.all_to_all_single(output, input, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    return output


class _AllToAll(torch.autograd.Function):

    @staticmethod
    def forward(ctx, input, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(input, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all_rows(input: torch.Tensor, send_splits: List[int], recv_splits: List[int], group,
                    world_size: int) -> torch.Tensor:
    """Send ``send_splits[r]`` consecutive rows of ``input`` to rank ``r`` of ``group``; returns the
    rows received, ``recv_splits[r]`` from rank ``r``, in rank order. Differentiable.
    With ``world_size == 1`` the input is returned as is."""
    if world_size == 1:
        return input
    return _AllToAll.apply(input, list(send_splits), list(recv_splits), group)


def exchange_counts(counts: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """All-to-all of a ``[world_size, n]`` integer tensor: row ``r`` goes to rank ``r``; returns
    the ``[world_size, n]`` rows received (row ``r`` from rank ``r``). Not differentiable."""
    if world_size == 1:
        return counts
    counts = counts.contiguous()
    output = torch.empty_like(counts)
    dist.all_to_all_single(output, counts, group=group)
    return output


def all_reduce_max(value: int, group, world_size: int, device: Optional[torch.device] = None) -> int:
    """The largest ``value`` over ``group`` (a plain int)."""
    if world_size == 1:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())
