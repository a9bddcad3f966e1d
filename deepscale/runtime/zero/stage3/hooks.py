"""Per-module hook state: which groups a module needs and the hooks that request them.

Every submodule of the model gets one :class:`ModuleHooks`. Its forward pre-hook asks the
coordinator for the groups of the module's own parameters plus the parameters registered as
external with :func:`deepscale.zero.register_external_parameter`; its forward post-hook gives
them back and, when autograd is recording, hooks the module's output tensors so that the same
groups are gathered again just before the module's backward runs. Outputs may be any nesting of
tuples, lists and dicts (``torch.utils._pytree``); non-tensor values are ignored. The root
module's hooks also open and close the forward in the coordinator.
"""
from typing import Callable, List

import torch
from torch.utils._pytree import tree_flatten

from deepscale.runtime.zero.stage3.coordinator import ParamCoordinator
from deepscale.runtime.zero.stage3.param_group import ParamGroup, find_group

EXTERNAL_PARAMS_ATTR = "_deepscale_external_params"


def external_params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Parameters registered as used by ``module`` though another module owns them."""
    return list(getattr(module, EXTERNAL_PARAMS_ATTR, {}).values())


class ModuleHooks:
    """The stage-3 hooks of one module.

    Args:
        module: the module.
        name: its qualified name (for messages).
        coordinator: the model's coordinator.
        is_root: whether this is the model the engine wraps.
        index: the module's position in ``model.named_modules()`` (the same on every rank).
    """

    def __init__(self, module: torch.nn.Module, name: str, coordinator: ParamCoordinator, is_root: bool,
                 index: int = 0):
        self.module, self.name, self.coordinator, self.is_root = module, name or "<root>", coordinator, is_root
        self.index = index
        self._own = self._groups_of(module.parameters(recurse=False))
        self._handles = [module.register_forward_pre_hook(self._pre_forward),
                         module.register_forward_hook(self._post_forward)]

    @staticmethod
    def _groups_of(params) -> List[ParamGroup]:
        groups, seen = [], set()
        for param in params:
            group = find_group(param)
            if group is not None and not group.persistent and group.index not in seen:
                seen.add(group.index)
                groups.append(group)
        return groups

    def groups(self) -> List[ParamGroup]:
        extra = external_params(self.module)
        if not extra:
            return self._own
        seen = {g.index for g in self._own}
        return self._own + [g for g in self._groups_of(extra) if g.index not in seen]

    def _pre_forward(self, module, args):
        if self.is_root:
            self.coordinator.begin_forward()
        self.coordinator.enter_module(self.name, self.index)
        groups = self.groups()
        if groups:
            self.coordinator.acquire(groups)

    def _post_forward(self, module, args, output):
        groups = self.groups()
        if torch.is_grad_enabled() and (groups or self.is_root) and not self._hook_outputs(output, groups):
            # No tensor to hook in the output (a custom object holding them): the groups could
            # not be re-gathered before this module's backward, which reads the weights autograd
            # saved, so they stay gathered until the backward ends.
            for group in groups:
                group.held_for_backward = True
        if groups:
            self.coordinator.release_after_forward(groups)
        if self.coordinator.module_stack:
            self.coordinator.module_stack.pop()
        if self.is_root:
            self.coordinator.end_forward()
        return None

    def _hook_outputs(self, output, groups: List[ParamGroup]) -> bool:
        """Hook the output tensors that will see a gradient; False when the output holds no
        tensor at all that pytree can see (so a backward through it could not be hooked)."""
        flat, _ = tree_flatten(output)
        hook = self._make_pre_backward(groups)
        found = False
        for value in flat:
            if isinstance(value, torch.Tensor):
                found = True
                if value.requires_grad and value.grad_fn is not None:
                    value.register_hook(hook)
        return found

    def _make_pre_backward(self, groups: List[ParamGroup]) -> Callable:
        coordinator = self.coordinator

        def pre_backward(grad):
            coordinator.pre_backward(groups)
            return None

        return pre_backward

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def install_module_hooks(model: torch.nn.Module, coordinator: ParamCoordinator) -> List[ModuleHooks]:
    """One :class:`ModuleHooks` per submodule of ``model`` (each module once, even if shared)."""
    return [ModuleHooks(module, name, coordinator, is_root=module is model, index=index)
            for index, (name, module) in enumerate(model.named_modules())]
