"""The one place where a config's optimizer picks deepscale's compiled kernels or torch's.

Note (the choice): for ``optimizer.type`` adam/adamw, adagrad and lion the factory asks
:func:`build_preferred` which implementation to build:

* every parameter on the CPU -> the compiled CPU optimizer (``DeepScaleCPUAdam``,
  ``DeepScaleCPUAdagrad``, ``DeepScaleCPULion``): one fused, vectorised, multi-threaded pass
  per parameter group (docs/benchmarks.md "Ops": 0-12% faster than torch's fused AdamW per
  step; torch has no fused CPU kernel for Lion at all);
* every parameter on CUDA and Adam -> ``FusedAdam`` (one multi-tensor launch per dtype group);
* otherwise (mixed or other devices, Adagrad/Lion on CUDA, no parameters), or when the config
  asks for something only torch does (``amsgrad``, ``maximize``, ``lr_decay``, an explicit
  ``foreach``/``fused``, ...), torch's optimizer.

A compiled optimizer is used only when its op builds; otherwise ``load_op`` logs one warning
naming the op and why, and torch's optimizer runs. The choice and its reason are logged once.
Opt-outs: ``"torch_adam": true`` in ``optimizer.params`` (DeepSpeed's key, Adam only) and
``DEEPSCALE_DISABLE_OPS=1`` (or a list of op names: ``cpu_adam,cpu_adagrad,cpu_lion,fused_adam``).
The compiled optimizers take the same hyperparameters with torch's defaults filled in (Lion's
CPU class has other defaults) and keep torch's state names (``exp_avg``, ``exp_avg_sq``,
``step``), so checkpoints move between the two.
"""
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from deepscale.ops.op_loader import load_op
from deepscale.utils.logging import log_dist

# torch keyword arguments the compiled optimizers accept, and the values of the others that
# they also match (anything else selects torch).
_SHARED_KEYS = {
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adagrad": ("lr", "eps", "weight_decay"),
    "lion": ("lr", "betas", "weight_decay"),
}
_NEUTRAL_VALUES = {"foreach": (None,), "fused": (None,), "amsgrad": (False,), "maximize": (False,), "lr_decay": (0, 0.0),
                   "initial_accumulator_value": (0, 0.0), "differentiable": (False,), "capturable": (False,)}
_logged = set()


@dataclass
class _Candidate:
    family: str          # "adam", "adagrad" or "lion"
    op_name: str
    make: Callable       # (params, **kwargs) -> optimizer
    label: str


def _cpu_candidate(family: str, decoupled: bool) -> _Candidate:
    if family == "adam":
        from deepscale.ops.adam import DeepScaleCPUAdam
        return _Candidate(family, "cpu_adam", lambda p, **kw: DeepScaleCPUAdam(p, adamw_mode=decoupled, **kw),
                          "DeepScaleCPUAdam")
    if family == "adagrad":
        from deepscale.ops.adagrad import DeepScaleCPUAdagrad
        return _Candidate(family, "cpu_adagrad", DeepScaleCPUAdagrad, "DeepScaleCPUAdagrad")
    from deepscale.ops.lion import DeepScaleCPULion
    return _Candidate(family, "cpu_lion", DeepScaleCPULion, "DeepScaleCPULion")


def _cuda_candidate(decoupled: bool) -> _Candidate:
    from deepscale.ops.adam import FusedAdam
    return _Candidate("adam", "fused_adam", lambda p, **kw: FusedAdam(p, adam_w_mode=decoupled, **kw), "FusedAdam")


def parameter_devices(param_list) -> List[str]:
    """Sorted device types of the tensors in a list of tensors or param-group dicts."""
    devices = set()
    for item in param_list:
        tensors = item["params"] if isinstance(item, dict) else [item]
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        devices.update(t.device.type for t in tensors)
    return sorted(devices)


def _torch_defaults(torch_cls) -> Dict[str, object]:
    return {p.name: p.default for p in inspect.signature(torch_cls.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty}


def _candidate_for(family: str, decoupled: bool, devices: List[str]) -> Tuple[Optional[_Candidate], str]:
    if devices == ["cpu"]:
        return _cpu_candidate(family, decoupled), "parameters on cpu"
    if devices == ["cuda"] and family == "adam":
        return _cuda_candidate(decoupled), "parameters on cuda"
    where = ", ".join(devices) if devices else "no parameters"
    return None, f"no compiled {family} optimizer for parameters on {where}"


def _torch_only_key(family: str, kwargs: dict) -> Optional[str]:
    for key, value in kwargs.items():
        if key in _SHARED_KEYS[family]:
            continue
        if value not in _NEUTRAL_VALUES.get(key, ()):
            return f"optimizer.params.{key}={value!r} asks for torch's implementation"
    return None


def _qualname(cls) -> str:
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _opt_out(family: str, op_name: str) -> str:
    env = f"DEEPSCALE_DISABLE_OPS={op_name}"
    return f"\"torch_adam\": true or {env} selects torch's" if family == "adam" else f"{env} selects torch's"


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log_dist(message, ranks=[0])


def build_preferred(family: str, kwargs: dict, param_list, torch_cls, build_torch: Callable[[], object],
                    decoupled: bool = True, config_name: Optional[str] = None):
    """Build the compiled optimizer of ``family`` when it is the faster choice here, else torch's.

    Args:
        family: "adam" (Adam and AdamW), "adagrad" or "lion".
        kwargs: the validated torch keyword arguments (``optimizer.params`` minus deepscale keys).
        param_list: tensors or param-group dicts.
        torch_cls: the torch optimizer class those arguments are for (its defaults are passed
            explicitly to a compiled optimizer, so results do not depend on the choice).
        build_torch: builds the torch optimizer (called when no compiled one is chosen).
        decoupled: Adam only: decoupled weight decay (AdamW). Default True.
        config_name: ``optimizer.type`` as written, for the log line. Default ``family``.

    Returns:
        the optimizer (a ``torch.optim.Optimizer``).
    """
    name = config_name or family
    devices = parameter_devices(param_list)
    candidate, reason = _candidate_for(family, decoupled, devices)
    if candidate is not None:
        group_keys = [{k: v for k, v in item.items() if k not in ("params", "name")}
                      for item in param_list if isinstance(item, dict)]
        refusal = next(filter(None, (_torch_only_key(family, keys) for keys in [kwargs] + group_keys)), None)
        if refusal is not None:
            candidate, reason = None, refusal
    if candidate is not None:
        fallback = f"{_qualname(torch_cls)} for optimizer '{name}'"
        if load_op(candidate.op_name, fallback=fallback) is None:
            candidate, reason = None, f"op '{candidate.op_name}' could not be loaded, see its warning"
    if candidate is None:
        optimizer = build_torch()
        _log_once(f"optimizer '{name}': {_qualname(type(optimizer))} ({reason})")
        return optimizer
    defaults = _torch_defaults(torch_cls)
    shared = {key: kwargs.get(key, defaults[key]) for key in _SHARED_KEYS[family] if key in kwargs or key in defaults}
    optimizer = candidate.make(param_list, **shared)
    _log_once(f"optimizer '{name}': deepscale {candidate.label}, compiled op '{candidate.op_name}' ({reason}; "
              f"{_opt_out(family, candidate.op_name)})")
    return optimizer
