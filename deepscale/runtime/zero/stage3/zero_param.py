"""The per-parameter sharded/gathered representation of ZeRO stage 3.

Note: the representation (DeepSpeed-compatible). A partitioned parameter stays the same
``nn.Parameter`` object the model and the user hold; only its ``.data`` changes. Each
parameter of ``ds_numel`` elements is padded to ``world_size * c`` with
``c = ceil(ds_numel / world_size)`` and rank ``r`` keeps elements ``[r*c, (r+1)*c)`` in
``param.ds_tensor``. While sharded, ``param.data`` is an empty tensor of the parameter's dtype
and ``param.ds_status`` is ``NOT_AVAILABLE``; while gathered, ``param.data`` is the full
tensor and ``ds_status`` is ``AVAILABLE``. ``ds_shape``, ``ds_numel``, ``ds_id`` and
``ds_persist`` describe the full parameter, as in DeepSpeed, so tools written against
DeepSpeed read them unchanged. Because every parameter is split on its own, the rank's piece of
a parameter is one contiguous range: exactly a fragment of the portable checkpoint format
(``runtime/checkpoint/portable.py``).

The functions here gather and re-partition single parameters (``GatheredParameters``,
``zero.Init``); the training hot path gathers whole groups at once (``param_group.py``).
"""
import itertools
from contextlib import nullcontext
from typing import Iterable, List, Optional, Tuple

import torch

from deepscale import comm as dist
from deepscale.runtime.zero.stage3.states import ZeroParamStatus

_NEXT_ID = itertools.count()


def is_zero_param(param) -> bool:
    """True for a parameter partitioned by ZeRO stage 3."""
    return isinstance(param, torch.Tensor) and hasattr(param, "ds_id")


def shard_numel(numel: int, world_size: int) -> int:
    """Elements each rank holds of a parameter of ``numel`` elements (at least one)."""
    return max(1, -(-numel // world_size))


def shard_range(numel: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(begin, end)`` of the elements of the full parameter that ``rank`` holds (may be empty)."""
    chunk = shard_numel(numel, world_size)
    begin = min(numel, rank * chunk)
    return begin, min(numel, begin + chunk)


def empty_like_param(dtype: torch.dtype, device) -> torch.Tensor:
    """The stand-in ``param.data`` of a sharded parameter."""
    return torch.empty(0, dtype=dtype, device=device)


@torch.no_grad()
def take_shard(full: torch.Tensor, rank: int, world_size: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """This rank's padded piece of ``full`` (flattened), as a new tensor of ``dtype``."""
    flat = full.reshape(-1)
    shard = torch.zeros(shard_numel(flat.numel(), world_size), dtype=dtype or full.dtype, device=full.device)
    begin, end = shard_range(flat.numel(), rank, world_size)
    if end > begin:
        shard[:end - begin].copy_(flat[begin:end])
    return shard


@torch.no_grad()
def partition_param(param: torch.nn.Parameter, group, world_size: int, rank: int,
                    dtype: Optional[torch.dtype] = None) -> None:
    """Turn a whole parameter into a partitioned one and set its ``ds_*`` attributes.

    Args:
        param: the parameter (its ``.data`` is replaced by an empty tensor).
        group: the data-parallel process group the parameter is split over.
        world_size, rank: size of ``group`` and this rank's index in it.
        dtype: dtype of the shard and of the parameter from now on. Default: unchanged.
    """
    if is_zero_param(param):
        raise ValueError("partition_param: the parameter is already partitioned")
    shard = take_shard(param.data, rank, world_size, dtype)
    param.ds_shape = param.data.shape
    param.ds_numel = param.data.numel()
    param.ds_tensor = shard
    param.ds_id = next(_NEXT_ID)
    param.ds_persist = False
    param.ds_process_group = group
    param.ds_world_size = world_size
    param.ds_rank = rank
    param.ds_status = ZeroParamStatus.NOT_AVAILABLE
    param.data = empty_like_param(shard.dtype, shard.device)


def shard_access(param, write: bool = False):
    """A context in which ``param.ds_tensor`` holds the shard's values, also when parameter
    offload keeps it elsewhere (``zero_optimization.offload_param``); with ``write``, what is
    written to ``ds_tensor`` inside is stored back on exit. Every rank of the group must enter
    it together when parameters are offloaded (write errors are agreed)."""
    group = getattr(param, "_ds_group", None)
    source = getattr(group, "shard_source", None)
    return source.resident(group, write) if source is not None else nullcontext()


def _src_rank(group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


@torch.no_grad()
def gather_param(param: torch.nn.Parameter) -> bool:
    """Make ``param.data`` the full tensor (a collective over its group). Returns True when it
    was sharded, False when it already was available."""
    if param.ds_status == ZeroParamStatus.AVAILABLE:
        return False
    group_obj = getattr(param, "_ds_group", None)
    if param.ds_status == ZeroParamStatus.INFLIGHT and group_obj is not None:
        group_obj.finish_gather()
        return False
    world = param.ds_world_size
    with shard_access(param):
        if world == 1:
            full = param.ds_tensor.clone()
        else:
            full = torch.empty(world * param.ds_tensor.numel(), dtype=param.ds_tensor.dtype,
                               device=param.ds_tensor.device)
            dist.all_gather_into_tensor(full, param.ds_tensor.contiguous(), group=param.ds_process_group)
    param.data = full[:param.ds_numel].view(param.ds_shape)
    param.ds_status = ZeroParamStatus.AVAILABLE
    return True


@torch.no_grad()
def write_back_shard(param: torch.nn.Parameter) -> None:
    """Copy this rank's piece of the (available) full ``param.data`` into its shard, and into
    the fp32 master when a stage-3 optimizer manages the parameter."""
    begin, end = shard_range(param.ds_numel, param.ds_rank, param.ds_world_size)
    flat = param.data.reshape(-1)
    with shard_access(param, write=True):  # entered on every rank, also one with an empty piece
        if end > begin:
            param.ds_tensor[:end - begin].copy_(flat[begin:end])
    master = getattr(param, "_ds_master_view", None)
    if master is not None and end > begin:
        master[:end - begin].copy_(flat[begin:end])


@torch.no_grad()
def release_param(param: torch.nn.Parameter) -> None:
    """Drop the full tensor of a parameter gathered with :func:`gather_param`."""
    param.data = empty_like_param(param.ds_tensor.dtype, param.ds_tensor.device)
    param.ds_status = ZeroParamStatus.NOT_AVAILABLE


@torch.no_grad()
def broadcast_full(params: Iterable[torch.nn.Parameter], modifier_rank: int) -> None:
    """Broadcast the full values of available parameters from ``modifier_rank`` of their group."""
    for param in params:
        if param.ds_world_size > 1:
            data = param.data if param.data.is_contiguous() else param.data.contiguous()
            dist.broadcast(data, src=_src_rank(param.ds_process_group, modifier_rank), group=param.ds_process_group)
            if data is not param.data:
                param.data.copy_(data)


def zero_params_of(params) -> List[torch.nn.Parameter]:
    """The partitioned parameters in ``params`` (a tensor, an iterable, or a module's parameters)."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    elif isinstance(params, torch.Tensor):
        params = [params]
    seen, out = set(), []
    for param in params:
        if is_zero_param(param) and id(param) not in seen:
            seen.add(id(param))
            out.append(param)
    return out
