"""The optimizer that runs an offloaded step: deepscale's SIMD CPU optimizers where one fits.

Note: steppers. The torch optimizer the user configured (``basic``) keeps the fp32 masters in
its ``param_groups`` and their states in ``basic.state``, so lr schedules, user code and
checkpoints see one optimizer. It is never stepped itself once offload is on: a *stepper* is.
A stepper runs the same algorithm with the same hyperparameters (copied from ``basic`` at every
step, so schedules apply) over a subset of the masters (the host tier, one NVMe sub-group,
or the device tier of Twin-Flow), and shares ``basic.state``. For the host, Adam/AdamW (torch's
or ``FusedAdam``), Adagrad and Lion become ``DeepScaleCPUAdam``/``Adagrad``/``Lion`` (one fused,
vectorised pass); those fall back to PyTorch math with one warning when their op cannot build.
Any other optimizer runs its own torch step on the host tensors, with one warning.
"""
from typing import List, Sequence

import torch

from deepscale.ops.cpu_optimizer_base import CPUOptimizerBase, fill_group_defaults
from deepscale.utils.logging import warning_once

_HOST_KEYS = {"DeepScaleCPUAdam": ("lr", "betas", "eps", "weight_decay"),
              "DeepScaleCPUAdagrad": ("lr", "eps", "weight_decay"),
              "DeepScaleCPULion": ("lr", "betas", "weight_decay")}


def _host_class(basic):
    """``(cpu optimizer class, extra kwargs)`` for ``basic``, or None when none matches exactly."""
    name, defaults = type(basic).__name__, basic.defaults
    if defaults.get("amsgrad") or defaults.get("maximize") or defaults.get("differentiable"):
        return None
    if name in ("Adam", "AdamW", "FusedAdam"):
        from deepscale.ops.adam import DeepScaleCPUAdam
        decoupled = getattr(basic, "adam_w_mode", name == "AdamW") if name == "FusedAdam" else name == "AdamW"
        if name == "FusedAdam" and not defaults.get("bias_correction", True):
            return None
        return DeepScaleCPUAdam, {"adamw_mode": bool(decoupled)}
    if name == "Adagrad" and not defaults.get("lr_decay") and not defaults.get("initial_accumulator_value"):
        from deepscale.ops.adagrad import DeepScaleCPUAdagrad
        return DeepScaleCPUAdagrad, {}
    if name == "Lion":
        from deepscale.ops.lion import DeepScaleCPULion
        return DeepScaleCPULion, {}
    return None


def host_stepper(basic: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A stepper (see the module Note) that updates host tensors; shares ``basic.state``."""
    if isinstance(basic, CPUOptimizerBase):
        return device_stepper(basic)
    found = _host_class(basic)
    if found is None:
        warning_once(f"offload_optimizer: {type(basic).__name__} has no deepscale CPU optimizer; its own torch step "
                     "runs on the host tensors (slower than DeepScaleCPUAdam/Adagrad/Lion)")
        return device_stepper(basic)
    cls, extra = found
    kwargs = {k: basic.defaults[k] for k in _HOST_KEYS[cls.__name__] if k in basic.defaults}
    dummy = torch.nn.Parameter(torch.zeros(1))
    stepper = cls([dummy], **kwargs, **extra)
    stepper.state = basic.state
    return stepper


def device_stepper(basic: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A shallow copy of ``basic`` with its own param groups (see :func:`sync_groups`); shares its state."""
    # Not copy.copy: torch optimizers pickle (and so copy) only defaults, state and groups.
    stepper = object.__new__(type(basic))
    stepper.__dict__.update(basic.__dict__)
    stepper.param_groups = [dict(g) for g in basic.param_groups]
    if isinstance(stepper, CPUOptimizerBase):
        stepper._plans = {}
    return stepper


def sync_groups(stepper, basic, params_per_group: Sequence[List[torch.Tensor]]) -> None:
    """Give ``stepper`` ``basic``'s current hyperparameters, each group over ``params_per_group[i]``.

    The group dicts are reused between steps (a compiled optimizer caches its packing per group).
    """
    while len(stepper.param_groups) < len(basic.param_groups):
        stepper.param_groups.append({})
    del stepper.param_groups[len(basic.param_groups):]
    for mine, theirs, params in zip(stepper.param_groups, basic.param_groups, params_per_group):
        for key, value in theirs.items():
            if key != "params":
                mine[key] = value
        mine["params"] = list(params)
    fill_group_defaults(stepper)
