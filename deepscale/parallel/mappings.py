"""Autograd-aware collectives that move activations into and out of tensor-parallel regions.

Note: the four Megatron pairs. A tensor-parallel region begins where a replicated activation
enters a column-parallel layer and ends where a row-parallel layer's partial sums are combined
(Shoeybi et al. 2019, "Megatron-LM"). Each transition is one collective forward and its adjoint
backward:

* ``copy_to_region``: identity forward, all-reduce backward (every rank's input gradient is a
  partial sum over its slice of the layer);
* ``reduce_from_region``: all-reduce forward, identity backward;
* ``split_along_dim`` / ``gather_along_dim``: take this rank's slice / concatenate the slices,
  each the other's adjoint;
* with sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models") the replicated activations between regions are instead split along the
  sequence: ``gather_sequence`` (all-gather forward, reduce-scatter backward) replaces the copy
  and ``reduce_scatter_sequence`` (reduce-scatter forward, all-gather backward) replaces the
  all-reduce, so norms and dropout see only 1/tp of the tokens.

Slices may be of unequal size (``sizes``), which uneven head counts need; the collectives then
pad to the largest slice because gloo and NCCL all-gather equal-sized buffers.
"""
from typing import List, Optional, Sequence

import torch

from deepscale import comm as dist


def group_size(group) -> int:
    """World size of ``group`` (1 before torch.distributed is initialised)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    """This rank's index in ``group`` (0 before torch.distributed is initialised)."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def even_sizes(total: int, parts: int, unit: int = 1) -> List[int]:
    """Split ``total`` into ``parts`` sizes, multiples of ``unit``, the first ones larger by one unit.

    Raises:
        ValueError: ``total`` is not a multiple of ``unit`` or has fewer units than ``parts``.
    """
    if total % unit:
        raise ValueError(f"cannot split {total} into pieces of {unit}: {total} is not a multiple of {unit}")
    units = total // unit
    if units < parts:
        raise ValueError(f"cannot split {units} pieces of {unit} over {parts} ranks: fewer pieces than ranks")
    base, extra = divmod(units, parts)
    return [(base + (1 if i < extra else 0)) * unit for i in range(parts)]


def _check_sizes(sizes: Sequence[int], total: int, world: int, what: str) -> List[int]:
    sizes = list(sizes)
    if len(sizes) != world or sum(sizes) != total:
        raise ValueError(f"{what}: sizes {sizes} must have one entry per rank ({world}) and sum to {total}")
    return sizes


def _gather(x: torch.Tensor, dim: int, group, sizes: Optional[Sequence[int]]) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    if sizes is None:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)
    longest = max(sizes)
    if x.shape[dim] < longest:  # pad this rank's slice to the common size
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def _split(x: torch.Tensor, dim: int, group, sizes: Optional[Sequence[int]]) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    if sizes is None:
        if x.shape[dim] % world:
            raise ValueError(f"tensor-parallel split: dimension {dim} of size {x.shape[dim]} is not divisible by "
                             f"the group size {world}")
        sizes = [x.shape[dim] // world] * world
    sizes = _check_sizes(sizes, x.shape[dim], world, "tensor-parallel split")
    rank = group_rank(group)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] % world:
        raise ValueError(f"sequence parallelism: the sequence dimension ({dim}) has length {x.shape[dim]}, which is "
                         f"not divisible by the tensor-parallel size {world}; pad the sequence to a multiple of it")
    chunks = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SplitAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, sizes):
        ctx.dim, ctx.group, ctx.sizes = dim, group, sizes
        return _split(x, dim, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group, ctx.sizes), None, None, None


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, sizes):
        ctx.dim, ctx.group, ctx.sizes = dim, group, sizes
        return _gather(x, dim, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group, ctx.sizes), None, None, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group, None)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group, None), None, None


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over ``group`` backward."""
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) over ``group`` forward; identity backward."""
    return _ReduceFromRegion.apply(x, group)


def split_along_dim(x: torch.Tensor, group, dim: int = -1, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (equal slices, or ``sizes[rank]`` long); gather backward."""
    return _SplitAlongDim.apply(x, dim, group, None if sizes is None else tuple(sizes))


def gather_along_dim(x: torch.Tensor, group, dim: int = -1, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (slices of ``sizes`` when unequal); split backward."""
    return _GatherAlongDim.apply(x, dim, group, None if sizes is None else tuple(sizes))


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: all-gather the sequence slices forward; reduce-scatter backward."""
    return _GatherSequence.apply(x, dim, group)


def reduce_scatter_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: sum partial outputs and keep this rank's sequence slice; all-gather backward."""
    return _ReduceScatterSequence.apply(x, dim, group)


def scatter_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: this rank's slice of a replicated activation (e.g. the embeddings)."""
    return _SplitAlongDim.apply(x, dim, group, None)


def allreduce_grad_over(param: torch.nn.Parameter, group) -> None:
    """Sum ``param``'s gradient over ``group`` as it is produced.

    For parameters held whole on every tensor-parallel rank whose gradient each rank only
    partly computes: norms and row-parallel biases under sequence parallelism (each rank sees a
    slice of the tokens) and key/value projections replicated for grouped-query attention (each
    rank uses them for its own query heads). Marks ``param.sequence_parallel = True``.
    """
    if group_size(group) == 1 or getattr(param, "_deepscale_tp_grad_hook", False):
        return
    param.register_hook(lambda grad: _all_reduce(grad, group))
    param._deepscale_tp_grad_hook = True
    param.sequence_parallel = True
