"""``zero.Init``, ``GatheredParameters`` and external parameters: ZeRO-3 outside the engine.

DeepSpeed users import ``ZeroParamStatus``, ``Init`` and ``GatheredParameters`` from this
module; the names and arguments match. The per-parameter representation these act on is
described in ``runtime/zero/stage3/zero_param.py``.

Note: partitioning at construction. Inside ``with zero.Init(...)`` the ``__init__`` of every
``nn.Module`` class is wrapped; when the outermost ``__init__`` of a module returns, the
parameters it created (and any of its children's not yet partitioned) are broadcast from rank 0
(so every rank starts from the same values) and partitioned. Only one module's parameters are
whole at a time, so a model larger than one rank's memory can be built. ``Module.apply`` is
wrapped too, so weight initialisers run by ``model.apply(init_fn)`` inside the context see
gathered parameters and their changes are kept (rank 0's).
"""
import functools
import json
import os
from typing import Dict, Optional

import torch

from deepscale import comm as dist
from deepscale.accelerator import get_accelerator  # noqa: F401  (DeepSpeed clients read pp.get_accelerator)
# Looked up by name at every Init.__enter__, so callers may replace it here (see constructors.py).
from deepscale.runtime.zero.stage3.constructors import (_orig_torch_arange, patch_fp_constructors,  # noqa: F401
                                                        restore_fp_constructors,
                                                        zero_wrapper_for_fp_tensor_constructor)
from deepscale.runtime.zero.stage3.hooks import EXTERNAL_PARAMS_ATTR
from deepscale.runtime.zero.stage3.states import ZeroParamStatus
from deepscale.runtime.zero.stage3.zero_param import (broadcast_full, gather_param, is_zero_param, partition_param,
                                                      release_param, write_back_shard, zero_params_of)
from deepscale.utils.logging import warning_once

__all__ = ["ZeroParamStatus", "Init", "GatheredParameters", "register_external_parameter",
           "unregister_external_parameter"]


def _config_dtype(config_dict_or_path) -> Optional[torch.dtype]:
    if config_dict_or_path is None:
        return None
    if isinstance(config_dict_or_path, (str, os.PathLike)):
        with open(config_dict_or_path) as handle:
            config_dict_or_path = json.load(handle)
    if not isinstance(config_dict_or_path, dict):
        raise TypeError(f"zero.Init(config_dict_or_path=...) must be a dict or a JSON file path, got "
                        f"{type(config_dict_or_path).__name__}")
    # `is True`: an unfilled "auto" (Hugging Face configs) does not enable a 16-bit dtype.
    if (config_dict_or_path.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    if ((config_dict_or_path.get("bf16") or config_dict_or_path.get("bfloat16")) or {}).get("enabled") is True:
        return torch.bfloat16
    return None


def _all_module_classes():
    seen, stack = [], [torch.nn.Module]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen


class Init:
    """Partition parameters as modules are constructed (a context manager), or partition an existing model.

    Args:
        module: an existing model to partition now (``zero.Init(module=model)``). Default None.
        data_parallel_group: the group parameters are split over. Default: the world (or ``mpu``'s).
        mem_efficient_linear: accepted for DeepSpeed compatibility.
        remote_device: ``None``/``"cpu"``/the accelerator: where shards live (the parameters'
            own device). ``"nvme"`` builds the shards in host memory (a one-time warning says
            so); ``deepscale.initialize`` moves them to NVMe when the config's
            ``zero_optimization.offload_param.device`` is ``"nvme"``.
        pin_memory: accepted for DeepSpeed compatibility.
        config_dict_or_path: a DeepSpeed config (dict or JSON path); fp16/bf16 set the dtype.
        config: alias of ``config_dict_or_path``.
        enabled: False makes the context a no-op. Default True.
        dtype: dtype of the partitioned parameters, and of floating tensors the torch factories
            create inside the context (see stage3/constructors.py). Default: from the config
            (``bf16.enabled``/``fp16.enabled`` true), else unchanged.
        mpu: a model-parallel unit providing ``get_data_parallel_group()``.
    """

    def __init__(self, module: Optional[torch.nn.Module] = None, data_parallel_group=None,
                 mem_efficient_linear: bool = True, remote_device=None, pin_memory: bool = False,
                 config_dict_or_path=None, config=None, enabled: bool = True, dtype: Optional[torch.dtype] = None,
                 mpu=None, **unused):
        self.enabled = bool(enabled)
        if remote_device == "nvme":
            warning_once("zero.Init(remote_device='nvme'): the shards are built in host memory (1/N of the model "
                         "per rank) and move to NVMe when deepscale.initialize applies "
                         "zero_optimization.offload_param.device='nvme'")
        elif remote_device not in (None, "none", "cpu", "cuda") and not str(remote_device).startswith("cuda"):
            raise ValueError(f"zero.Init(remote_device={remote_device!r}): allowed values are None, 'cpu', 'nvme' "
                             "or the accelerator")
        self.dtype = dtype or _config_dtype(config_dict_or_path if config_dict_or_path is not None else config)
        self._patched, self._depth, self._saved_apply, self._saved_init_subclass = [], {}, None, None
        self._saved_constructors = None
        if not self.enabled:
            return
        if not dist.is_initialized():
            dist.init_distributed()
        self.group = data_parallel_group if data_parallel_group is not None else (
            mpu.get_data_parallel_group() if mpu is not None else None)
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if module is not None:
            self.partition_module(module)

    # --- partitioning ---------------------------------------------------------------------
    @torch.no_grad()
    def partition_module(self, module: torch.nn.Module) -> None:
        """Partition every parameter of ``module`` not partitioned yet (rank 0's values win)."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for param in module.parameters():
            if is_zero_param(param):
                continue
            if self.world_size > 1:
                dist.broadcast(param.data, src=src, group=self.group)
            partition_param(param, self.group, self.world_size, self.rank, dtype=self.dtype)

    def _wrap_class(self, cls) -> None:
        original = cls.__dict__.get("__init__")
        if original is None or getattr(original, "_deepscale_zero_init", False):
            return
        init_ctx = self

        @functools.wraps(original)
        def wrapped(module, *args, **kwargs):
            key = id(module)
            init_ctx._depth[key] = init_ctx._depth.get(key, 0) + 1
            try:
                original(module, *args, **kwargs)
            finally:
                init_ctx._depth[key] -= 1
            if init_ctx._depth[key] == 0:
                del init_ctx._depth[key]
                init_ctx.partition_module(module)

        wrapped._deepscale_zero_init = True
        cls.__init__ = wrapped
        self._patched.append((cls, original))

    def __enter__(self):
        if not self.enabled:
            return self
        for cls in _all_module_classes():
            self._wrap_class(cls)
        init_ctx = self
        self._saved_init_subclass = torch.nn.Module.__dict__.get("__init_subclass__")

        def init_subclass(cls, **kwargs):
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            init_ctx._wrap_class(cls)

        torch.nn.Module.__init_subclass__ = classmethod(init_subclass)
        self._saved_apply = torch.nn.Module.apply
        torch.nn.Module.apply = _gathering_apply
        if self.dtype is not None:
            self._saved_constructors = patch_fp_constructors(zero_wrapper_for_fp_tensor_constructor, self.dtype,
                                                             target_device=None)
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        for cls, original in reversed(self._patched):
            cls.__init__ = original
        self._patched = []
        if self._saved_init_subclass is None:
            del torch.nn.Module.__init_subclass__
        else:
            torch.nn.Module.__init_subclass__ = self._saved_init_subclass
        torch.nn.Module.apply = self._saved_apply
        if self._saved_constructors is not None:
            restore_fp_constructors(self._saved_constructors)
            self._saved_constructors = None
        return False


def _gathering_apply(module: torch.nn.Module, fn):
    """``Module.apply`` inside ``zero.Init``: ``fn`` sees each module's parameters gathered."""
    for child in module.children():
        child.apply(fn)
    with GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
        fn(module)
    return module


class GatheredParameters:
    """Gather partitioned parameters on entry and re-partition them on exit (a collective).

    Args:
        params: a parameter, an iterable of parameters, or a module (its parameters).
            Parameters that are not partitioned are ignored.
        modifier_rank: the rank (in the parameters' group) whose changes are kept: its values
            are broadcast to all ranks and written into every rank's shard (and fp32 master).
            None: changes are discarded. Default None.
        fwd_module: accepted for DeepSpeed compatibility.
        enabled: False makes the context a no-op. Default True.
    """

    def __init__(self, params, modifier_rank: Optional[int] = None, fwd_module=None, enabled: bool = True):
        if modifier_rank is not None and not isinstance(modifier_rank, int):
            raise TypeError(f"GatheredParameters(modifier_rank=...) must be an int rank or None, got "
                            f"{type(modifier_rank).__name__}")
        self.params = zero_params_of(params) if enabled and params is not None else []
        self.modifier_rank = modifier_rank
        self._gathered = []

    def __enter__(self):
        self._gathered = [p for p in self.params if gather_param(p)]
        return None

    def __exit__(self, *exc):
        available = [p for p in self.params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if self.modifier_rank is not None:
            broadcast_full(available, self.modifier_rank)
            for param in available:
                write_back_shard(param)
        for param in self._gathered:
            if param.ds_status == ZeroParamStatus.AVAILABLE:
                release_param(param)
        self._gathered = []
        return False


def _external_table(module: torch.nn.Module) -> Dict[int, torch.nn.Parameter]:
    table = module.__dict__.get(EXTERNAL_PARAMS_ATTR)
    if table is None:
        table = {}
        module.__dict__[EXTERNAL_PARAMS_ATTR] = table
    return table


def register_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """Declare that ``module``'s forward uses ``parameter`` though another module owns it, so
    ZeRO-3 gathers it for ``module`` (forward and backward). Harmless without ZeRO-3."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"register_external_parameter: module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(parameter, torch.nn.Parameter):
        raise TypeError(f"register_external_parameter: parameter must be an nn.Parameter, got "
                        f"{type(parameter).__name__}")
    _external_table(module)[id(parameter)] = parameter


def unregister_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """Undo :func:`register_external_parameter`."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"unregister_external_parameter: module must be an nn.Module, got {type(module).__name__}")
    table = _external_table(module)
    if id(parameter) not in table:
        raise ValueError("unregister_external_parameter: the parameter is not registered with this module")
    del table[id(parameter)]
