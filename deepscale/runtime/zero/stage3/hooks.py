"""Per-module hook state: which groups a module needs and the hooks that request them.

Every submodule of the model gets one :class:`ModuleHooks`. Its forward pre-hook asks the
coordinator for the groups of the module's own parameters plus the parameters registered as
external with :func:`deepscale.zero.register_external_parameter`; its forward post-hook gives
them back and, when autograd is recording, hooks the module's output tensors so that the same
groups are gathered again just before the module's backward runs. Outputs may be any nesting of
tuples, lists and dicts (``torch.utils._pytree``); non-tensor values are ignored. The root
module's hooks also open and close the forward in the coordinator.

Note: leaf modules (``deepscale.utils.set_z3_leaf_modules``). A leaf module's hooks gather the
parameters of the module and of all its descendants at once, and the descendants get no hooks:
a mixture-of-experts block that runs a data-dependent subset of its experts then issues the same
collectives on every rank and every step, whichever experts run.

Note: automatic external parameters. Each module's ``_parameters`` dict is replaced by
:class:`_ZeroParamDict`, whose item lookup (what ``module.weight`` ends in) sees when a forward
reads a parameter that is not gathered, e.g. ``F.linear(x, self.linear1.weight)`` in a parent.
It then registers the parameter as external with the innermost module whose forward is running
and gathers its group through the coordinator, as if it had been registered by hand: the next
forwards gather it in that module's pre-hook, and backward re-gathers it. Every rank runs the
same forward, so the on-demand gather is issued at the same point on all of them (the sequence
check verifies it). A parameter read through a reference kept outside ``_parameters`` (stored in
a list in ``__init__``) cannot be seen this way; the forward check (``external_check.py``) still
raises :class:`ExternalParameterError` for it.
"""
from typing import Callable, List

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from deepscale.runtime.zero.stage3.coordinator import ParamCoordinator
from deepscale.runtime.zero.stage3.param_group import ParamGroup, find_group
from deepscale.runtime.zero.stage3.states import ZeroParamStatus
from deepscale.utils.logging import logger
from deepscale.utils.zero3_leaf import LEAF_ATTR

EXTERNAL_PARAMS_ATTR = "_deepscale_external_params"


class _PostBackward(torch.autograd.Function):
    """Identity on a module's inputs whose backward runs once the module's backward is done
    (the gradients of its inputs are computed): frozen groups are released there."""

    @staticmethod
    def forward(ctx, hooks, *tensors):
        ctx.hooks = hooks
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        ctx.hooks.coordinator.post_backward(ctx.hooks.groups())
        return (None,) + grads


class _ZeroParamDict(dict):
    """A module's ``_parameters`` that notices reads of parameters that are not gathered."""

    def __init__(self, params, coordinator: ParamCoordinator):
        super().__init__(params)
        self.coordinator = coordinator

    def __getitem__(self, key):
        param = dict.__getitem__(self, key)
        if param is not None and getattr(param, "ds_status", ZeroParamStatus.AVAILABLE) != ZeroParamStatus.AVAILABLE:
            running = self.coordinator.running_hooks
            if running:
                running[-1].use_external(param)
        return param


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
        # a leaf module gathers its descendants' parameters too (see the module Note)
        self._own = self._groups_of(module.parameters(recurse=bool(getattr(module, LEAF_ATTR, False))))
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
        self.coordinator.running_hooks.append(self)
        groups = self.groups()
        if groups:
            self.coordinator.acquire(groups)
            if torch.is_grad_enabled() and self.coordinator.has_frozen(groups):
                return self._hook_inputs(args)
        return None

    def _hook_inputs(self, args):
        """Route the inputs that need gradients through :class:`_PostBackward` (see Note in
        coordinator.py: frozen groups in backward)."""
        flat, spec = tree_flatten(args)
        picked = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and v.requires_grad]
        if not picked:
            return None
        for i, value in zip(picked, _PostBackward.apply(self, *[flat[i] for i in picked])):
            flat[i] = value
        return tree_unflatten(flat, spec)

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
        if self.coordinator.running_hooks:
            self.coordinator.running_hooks.pop()
        if self.is_root:
            self.coordinator.end_forward()
        return None

    def use_external(self, param: torch.nn.Parameter) -> None:
        """This module's forward reads ``param``, which it does not gather: register it as
        external and gather it now (see the module Note)."""
        group = find_group(param)
        if group is None:
            return  # partitioned outside the engine (zero.Init without training): left as is
        table = self.module.__dict__.setdefault(EXTERNAL_PARAMS_ATTR, {})
        if id(param) not in table:
            table[id(param)] = param
            logger.debug(f"ZeRO-3: registered a parameter of group {group.index} ({group.names[0]}...) as external "
                         f"to module '{self.name}', whose forward reads it")
        if not group.persistent:
            self.coordinator.acquire([group])
        if not group.is_gathered:
            self.coordinator.fetch(group)

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
    """One :class:`ModuleHooks` per submodule of ``model`` (each module once, even if shared),
    except below leaf modules; every module's ``_parameters`` becomes a :class:`_ZeroParamDict`."""
    hooks, leaves = [], []
    for index, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module.__dict__.get("_parameters"), _ZeroParamDict):
            module._parameters = _ZeroParamDict(module._parameters, coordinator)
        if any(name.startswith(leaf + ".") for leaf in leaves):
            continue  # inside a leaf module: gathered by the leaf's hooks
        if getattr(module, LEAF_ATTR, False) and module is not model:
            leaves.append(name)
            for param in module.parameters():
                param.ds_z3_leaf = True
        hooks.append(ModuleHooks(module, name, coordinator, is_root=module is model, index=index))
    return hooks


def remove_module_hooks(model: torch.nn.Module, hooks: List[ModuleHooks]) -> None:
    """Undo :func:`install_module_hooks`."""
    for hook in hooks:
        hook.remove()
    for module in model.modules():
        params = module.__dict__.get("_parameters")
        if isinstance(params, _ZeroParamDict):
            module._parameters = dict(params)
