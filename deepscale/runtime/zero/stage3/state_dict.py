"""Module state dicts under ZeRO stage 3: full weights on request, loading into shards.

Note: what ``model.state_dict()`` returns. Outside a gather a partitioned parameter's
``.data`` is empty, so by default ``state_dict()`` holds empty tensors for them, as in
DeepSpeed. :func:`full_state_dict` gathers the groups one at a time and keeps CPU copies on
rank 0 (every rank must call it); while :func:`serving_full_weights` is active the model's
``state_dict()`` returns those full tensors, which is how engine checkpoints store whole
module weights that load at any stage. Loading (``load_state_dict``) is always supported: a
pre-hook copies the rank's piece of each full tensor into the shard (and the fp32 master) and
hands the module an empty tensor for parameters that are not gathered.
"""
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch

from deepscale.runtime.zero.stage3.param_group import ParamGroup
from deepscale.runtime.zero.stage3.states import ZeroParamStatus
from deepscale.runtime.zero.stage3.zero_param import is_zero_param, shard_access, shard_range


def _partitioned_keys(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    return {key: value for key, value in model.state_dict(keep_vars=True).items() if is_zero_param(value)}


@torch.no_grad()
def full_state_dict(model: torch.nn.Module, groups: List[ParamGroup], rank0_only: bool = True,
                    dtype: Optional[torch.dtype] = None) -> Optional[Dict[str, torch.Tensor]]:
    """The model's state dict with every partitioned parameter whole, on CPU (a collective).

    Args:
        model: the partitioned model.
        groups: its parameter groups.
        rank0_only: only rank 0 keeps the tensors (others return None). Default True.
        dtype: cast floating-point parameters to this dtype. Default: their own dtype.
    """
    keep = not rank0_only or groups[0].runner.world_size == 1 or _group_rank(groups[0]) == 0
    full = gather_full_weights(groups, keep, dtype)
    if not keep:
        return None
    with serving_full_weights(model, full):
        return {k: v.detach().cpu().clone() if not is_zero_param(v) else v for k, v in model.state_dict().items()}


@torch.no_grad()
def gather_full_weights(groups: List[ParamGroup], keep: bool = True,
                        dtype: Optional[torch.dtype] = None) -> Dict[int, torch.Tensor]:
    """``id(param) -> whole CPU copy`` of every partitioned parameter, one group at a time (a
    collective; a rank with ``keep=False`` joins the gathers and returns an empty dict)."""
    full: Dict[int, torch.Tensor] = {}
    for group in groups:
        was_gathered = group.is_gathered
        group.finish_gather()
        if keep:
            for param in group.params:
                value = param.data.detach().to("cpu", copy=True)
                full[id(param)] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        if not was_gathered:
            group.release()
    return full


def _group_rank(group: ParamGroup) -> int:
    return group.params[0].ds_rank


@contextmanager
def serving_full_weights(model: torch.nn.Module, full: Dict[int, torch.Tensor]):
    """While active, ``model.state_dict()`` returns ``full[id(param)]`` for partitioned parameters."""
    keys = _partitioned_keys(model)

    def substitute(module, state_dict, prefix, local_metadata):
        for key, param in keys.items():
            if prefix + key in state_dict and id(param) in full:
                state_dict[prefix + key] = full[id(param)]
        return state_dict

    handle = model._register_state_dict_hook(substitute)
    try:
        yield
    finally:
        handle.remove()


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for name, param in module._parameters.items():
        key = prefix + name
        if param is None or not is_zero_param(param) or key not in state_dict:
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.numel() != param.ds_numel:
            continue  # let the module report the size mismatch
        begin, end = shard_range(param.ds_numel, param.ds_rank, param.ds_world_size)
        flat = value.reshape(-1)
        with torch.no_grad(), shard_access(param, write=True):
            param.ds_tensor[:end - begin].copy_(flat[begin:end])
            master = getattr(param, "_ds_master_view", None)
            if master is not None:
                master[:end - begin].copy_(flat[begin:end])
        if param.ds_status != ZeroParamStatus.AVAILABLE:
            state_dict[key] = param.data  # empty, so the module's own copy is a no-op


def install_load_hooks(model: torch.nn.Module) -> list:
    """Pre-hooks so ``load_state_dict`` of full weights fills the shards; returns the handles."""
    handles = []
    for module in model.modules():
        if any(is_zero_param(p) for p in module._parameters.values() if p is not None):
            handles.append(module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True))
    return handles
