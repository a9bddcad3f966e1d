"""Partition a model's parameters and pack them into parameter groups, without a user policy.

Note: how groups are formed. Modules are visited in registration order (``named_modules``),
which for almost every model is the order the forward runs them in. The parameters a module
owns directly are appended to the open group; the group is closed at a module boundary once it
holds at least ``group_numel`` elements or when the dtype/device changes. A transformer block
thus travels as one or a few all-gathers (a module, or a run of consecutive small modules),
not one collective per tensor. A parameter shared by several modules (tied embeddings) belongs
to the group of the first module that registers it; the other modules' hooks gather that group
too. Parameters below ``stage3_param_persistence_threshold`` elements go to persistent groups
that are gathered once and kept, as in DeepSpeed.
"""
from typing import Callable, Dict, List, Optional

import torch

from deepscale.runtime.zero.stage3.collectives import CollectiveRunner
from deepscale.runtime.zero.stage3.param_group import ParamGroup

DEFAULT_GROUP_NUMEL = 1 << 22


class _OpenGroup:
    def __init__(self):
        self.params, self.names, self.modules, self.numel = [], [], [], 0

    def add(self, param, name: str, module_name: str) -> None:
        self.params.append(param)
        self.names.append(name)
        if module_name not in self.modules:
            self.modules.append(module_name)
        self.numel += param.ds_numel

    def key(self):
        return (self.params[0].ds_tensor.dtype, self.params[0].ds_tensor.device) if self.params else None


def build_groups(model: torch.nn.Module, runner: CollectiveRunner, group_numel: int,
                 persistence_threshold: int, names: Dict[torch.nn.Parameter, str],
                 include: Optional[Callable[[torch.nn.Parameter], bool]] = None,
                 first_index: int = 0) -> List[ParamGroup]:
    """Groups over every partitioned parameter of ``model`` (see the module Note).

    Args:
        model: the model; every parameter must already be partitioned.
        runner: the collective runner the groups use.
        group_numel: close a group at a module boundary once it holds this many elements.
        persistence_threshold: parameters with fewer elements are persistent.
        names: parameter -> qualified name.
        include: only parameters it accepts are grouped (expert parameters get groups of their
            own, over their expert-data-parallel runner). Default: every parameter.
        first_index: index of the first group. Default 0.
    """
    closed: List[_OpenGroup] = []
    persistent: Dict[tuple, _OpenGroup] = {}
    seen = set()
    current = _OpenGroup()
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or (include is not None and not include(param)):
                continue
            seen.add(id(param))
            key = (param.ds_tensor.dtype, param.ds_tensor.device)
            if param.ds_numel < persistence_threshold:
                persistent.setdefault(key, _OpenGroup()).add(param, names.get(param, "?"), module_name or "<root>")
                continue
            if current.params and current.key() != key:
                closed.append(current)
                current = _OpenGroup()
            current.add(param, names.get(param, "?"), module_name or "<root>")
        if current.numel >= group_numel:
            closed.append(current)
            current = _OpenGroup()
    if current.params:
        closed.append(current)
    groups = [ParamGroup(first_index + i, g.params, g.names, g.modules, runner) for i, g in enumerate(closed)]
    for g in persistent.values():
        groups.append(ParamGroup(first_index + len(groups), g.params, g.names, g.modules, runner, persistent=True))
    return groups
