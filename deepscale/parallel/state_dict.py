"""Whole (unsharded) state dicts of tensor-parallel models, and the way back.

A checkpoint that stores whole weights loads at any tensor-parallel degree: every rank of the
new layout takes its rows or columns (``shard_index``) out of the whole tensor. Layers record
which global rows/columns they hold, so shards of unequal size and head-wise layouts (a rank's
query, key and value rows of a fused projection) are put back in the right places. GPT-2's
``Conv1D`` weights, stored transposed, come back in their original layout.
"""
from typing import Dict, Iterator, Tuple

import torch
import torch.nn as nn

from deepscale.parallel.mappings import _gather, group_size


def _sizes_of(layer, dim: int):
    for name in ("output_sizes", "vocab_sizes") if dim == 0 else ("input_sizes",):
        if hasattr(layer, name):
            return list(getattr(layer, name))
    raise AssertionError(f"{type(layer).__name__} has no sizes for dim {dim}")


def tensor_parallel_layers(module: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(prefix, layer)`` for every layer holding a tensor-parallel shard."""
    for name, sub in module.named_modules():
        if hasattr(sub, "shard_index") and hasattr(sub, "tp_group"):
            yield (name + "." if name else ""), sub


def _whole(layer, param: torch.Tensor) -> torch.Tensor:
    dim = param.partition_dim
    sizes = _sizes_of(layer, dim)
    data = param.detach()
    if group_size(layer.tp_group) == 1:
        return data.clone()
    gathered = _gather(data, dim, layer.tp_group, sizes)
    index = _gather(layer.shard_index.to(torch.float64), 0, layer.tp_group, sizes).to(torch.long)
    whole = torch.empty_like(gathered)
    whole.index_copy_(dim, index.to(whole.device), gathered)
    return whole


@torch.no_grad()
def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` with every tensor-parallel shard replaced by the whole tensor.

    Every rank of each tensor-parallel group must call it (it all-gathers); every rank gets
    the result. Conv1D weights come back transposed to their original ``(in, out)`` layout.
    """
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for prefix, layer in tensor_parallel_layers(module):
        for pname in ("weight", "bias"):
            param = getattr(layer, pname, None)
            if param is None or not getattr(param, "tensor_model_parallel", False):
                continue
            whole = _whole(layer, param)
            if pname == "weight" and getattr(layer, "dense_layout", "linear") == "conv1d":
                whole = whole.t().contiguous()
            state[prefix + pname] = whole
    return state


@torch.no_grad()
def shard_state_dict(module: nn.Module, full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Cut a whole state dict (from :func:`full_state_dict` or the dense model) to ``module``'s shards.

    Keys of layers that are not sharded are passed through unchanged.
    """
    state = dict(full)
    for prefix, layer in tensor_parallel_layers(module):
        for pname in ("weight", "bias"):
            param = getattr(layer, pname, None)
            key = prefix + pname
            if param is None or key not in state or not getattr(param, "tensor_model_parallel", False):
                continue
            whole = state[key]
            if pname == "weight" and getattr(layer, "dense_layout", "linear") == "conv1d":
                whole = whole.t()
            state[key] = whole.index_select(param.partition_dim, layer.shard_index.to(whole.device)).contiguous()
    return state
