"""Parameter helpers for mixture-of-experts models (DeepSpeed's ``deepspeed.moe.utils``).

An expert parameter is marked by the MoE layer with ``param.allreduce = False`` (its gradient is
reduced over the expert-data-parallel group, not the whole data-parallel group) and
``param.group_name`` (the name of that group). A model without experts has no such parameter,
and every helper here then returns its input unchanged in content.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch

# Elements per expert param group before it is split; DeepSpeed's default is the same number,
# so code passing nothing keeps the groups it had.
DEFAULT_MAX_GROUP_SIZE = 178956971

__all__ = ["is_moe_param", "split_params_into_shared_and_expert_params",
           "split_params_grads_into_shared_and_expert_params", "split_params_into_different_moe_groups_for_optimizer",
           "is_moe_param_group", "configure_moe_param_groups", "has_moe_layers", "DEFAULT_MAX_GROUP_SIZE"]


def is_moe_param(param: torch.Tensor) -> bool:
    """True for a parameter owned by an expert (marked ``allreduce = False`` by the MoE layer)."""
    return getattr(param, "allreduce", True) is False


def split_params_into_shared_and_expert_params(params) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(shared, expert)``: ``params`` split by :func:`is_moe_param`, order kept."""
    shared, expert = [], []
    for param in params:
        (expert if is_moe_param(param) else shared).append(param)
    return shared, expert


def _as_group_list(param_groups) -> List[Dict]:
    if isinstance(param_groups, dict):
        return [param_groups]
    if isinstance(param_groups, (list, tuple)) and all(isinstance(g, dict) for g in param_groups):
        return list(param_groups)
    raise TypeError("split_params_into_different_moe_groups_for_optimizer: param_groups must be a param-group dict "
                    f"or a list/tuple of them, got {type(param_groups).__name__}")


def _chunk_by_numel(params: Sequence[torch.Tensor], max_group_size: int) -> List[List[torch.Tensor]]:
    chunks, current, numel = [], [], 0
    for param in params:
        if current and numel + param.numel() > max_group_size:
            chunks.append(current)
            current, numel = [], 0
        current.append(param)
        numel += param.numel()
    if current:
        chunks.append(current)
    return chunks


def split_params_into_different_moe_groups_for_optimizer(param_groups: Union[Dict, Sequence[Dict]],
                                                         max_group_size: int = DEFAULT_MAX_GROUP_SIZE
                                                         ) -> Tuple[Dict, ...]:
    """Move expert parameters into param groups of their own, one per (group, expert group name).

    Each input group keeps its non-expert parameters and its options. Expert parameters go to new
    groups that copy the options of the group they came from, with ``"moe": True`` and
    ``"name": f"{group_name}_{expert_group_name}"``; a new group holding more than
    ``max_group_size`` elements is split into several. Without expert parameters the groups come
    back as they were (a tuple of the same dicts).

    Args:
        param_groups: one param-group dict or a list/tuple of them; a group without ``"name"``
            is named ``"group{i}"`` by its position.
        max_group_size: most elements in one expert group. Default 178956971 (as DeepSpeed).
    """
    if not isinstance(max_group_size, int) or isinstance(max_group_size, bool) or max_group_size < 1:
        raise ValueError(f"max_group_size must be a positive int, got {max_group_size!r}")
    groups = _as_group_list(param_groups)
    result, expert_groups = [], []
    for index, group in enumerate(groups):
        params = list(group["params"]) if not torch.is_tensor(group["params"]) else [group["params"]]
        shared, expert = split_params_into_shared_and_expert_params(params)
        if not expert:
            result.append(group)
            continue
        name = group.get("name", f"group{index}")
        group["params"] = shared
        result.append(group)
        by_expert_group: Dict[str, List[torch.Tensor]] = {}
        for param in expert:
            by_expert_group.setdefault(str(getattr(param, "group_name", "expert")), []).append(param)
        options = {k: v for k, v in group.items() if k != "params"}
        for expert_name, members in by_expert_group.items():
            for chunk in _chunk_by_numel(members, max_group_size):
                expert_groups.append({**options, "name": f"{name}_{expert_name}", "moe": True, "params": chunk})
    return tuple(result + expert_groups)


def split_params_grads_into_shared_and_expert_params(group) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(shared grads, expert grads)`` of the parameters in ``group`` that have a gradient."""
    shared, expert = [], []
    for param in group:
        if param.grad is not None:
            (expert if is_moe_param(param) else shared).append(param.grad.to(param.dtype))
    return shared, expert


def is_moe_param_group(param_group: Dict) -> bool:
    """True for an optimizer param group holding expert parameters (``"moe": True``)."""
    return bool(param_group.get("moe", False))


def configure_moe_param_groups(model_parameters: List):
    """Param groups with the expert parameters in groups of their own, from what a user would pass
    an optimizer: a list of parameters (they become one group named ``"dense-params"`` before the
    split) or a list of param-group dicts (split unless a group is already marked ``"moe"``)."""
    if not isinstance(model_parameters, list) or not model_parameters:
        raise TypeError("configure_moe_param_groups: model_parameters must be a non-empty list of parameters or "
                        f"param-group dicts, got {type(model_parameters).__name__}")
    if all(isinstance(p, dict) for p in model_parameters):
        if any("moe" in group for group in model_parameters):
            return model_parameters
        return split_params_into_different_moe_groups_for_optimizer(model_parameters)
    if all(torch.is_tensor(p) for p in model_parameters):
        return split_params_into_different_moe_groups_for_optimizer({"params": model_parameters,
                                                                     "name": "dense-params"})
    kinds = sorted({type(p).__name__ for p in model_parameters})
    raise TypeError(f"configure_moe_param_groups: expected tensors or param-group dicts, got {kinds}")


def has_moe_layers(model: torch.nn.Module) -> Tuple[bool, int]:
    """``(True, num_experts of the first MoE layer)`` when ``model`` holds a MoE layer, else ``(False, 0)``."""
    for module in model.modules():
        if hasattr(module, "deepspeed_moe") and hasattr(module, "num_experts"):
            return True, int(module.num_experts)
    return False, 0
