"""Detects a partitioned parameter used in a forward that did not gather it.

Note: why detection is needed. A parameter is gathered for the forward of the module that
owns it (and of modules it is registered with as external). If another module's forward reads
it directly (``F.linear(x, self.wte.weight)`` in a parent, for a tied output layer) it is
still an empty tensor there, and the failure is a shape error deep inside an operator. While
this check is active (the first forward of an engine, and every forward in debug mode) a
``TorchFunctionMode`` looks at the tensor arguments of every torch call in the forward; a
partitioned parameter that is not available raises :class:`ExternalParameterError` naming the
parameter, the module whose forward used it and the call that registers it.
"""
from typing import Dict

import torch
from torch.overrides import TorchFunctionMode

from deepscale.runtime.zero.stage3.states import ZeroParamStatus


class ExternalParameterError(RuntimeError):
    """A partitioned parameter was used outside the forward of the modules that gather it."""


def _unavailable(value) -> bool:
    status = getattr(value, "ds_status", None)
    return status is not None and status != ZeroParamStatus.AVAILABLE


class PartitionedUseCheck(TorchFunctionMode):
    """Raises :class:`ExternalParameterError` when a torch call receives a sharded parameter.

    Args:
        names: parameter -> qualified name.
        current_module: a callable returning the name of the module whose forward runs.
    """

    def __init__(self, names: Dict[torch.nn.Parameter, str], current_module):
        super().__init__()
        self._names, self._current_module = names, current_module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in ("__get__", "__set__"):  # attribute access is harmless
            for value in list(args) + list(kwargs.values()):
                items = value if isinstance(value, (list, tuple)) else (value,)
                for item in items:
                    if isinstance(item, torch.nn.Parameter) and _unavailable(item):
                        self._raise(item, func)
        return func(*args, **kwargs)

    def _raise(self, param, func) -> None:
        name = self._names.get(param, f"<parameter ds_id={getattr(param, 'ds_id', '?')}>")
        module = self._current_module() or "<root>"
        raise ExternalParameterError(
            f"ZeRO-3: parameter '{name}' (shape {tuple(param.ds_shape)}) is partitioned and was used by "
            f"{getattr(func, '__name__', func)} in the forward of module '{module}', which does not gather it. "
            f"Register it so that module gathers it: deepscale.zero.register_external_parameter(module, param) "
            f"with module = the '{module}' module and param = '{name}' (usually inside the module's __init__).")
