"""Whole-tensor access to a parameter's fp32 weight, gradient and optimizer state.

Under ZeRO a rank holds only fragments of these; the training optimizer attaches an accessor
to every parameter it manages (``param._deepscale_full_access``) and these helpers dispatch to
it. For partitioned parameters the getters are collectives: call them on every rank of the
data-parallel group, for the same parameter, in the same order. The setters take the full
tensor (the same on every rank) and keep only the rank's fragment.

Gradients are available after the backward that ends an accumulation window and before
``engine.step()``.
"""
from typing import Optional

import torch

_ACCESS_ATTR = "_deepscale_full_access"


def _access(param):
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"expected a parameter tensor, got {type(param).__name__}")
    return getattr(param, _ACCESS_ATTR, None)


def safe_get_full_fp32_param(param) -> Optional[torch.Tensor]:
    """The full fp32 master weight of ``param``; None when no deepscale optimizer manages it."""
    access = _access(param)
    return None if access is None else access.get_full_fp32(param)


def safe_get_full_grad(param) -> Optional[torch.Tensor]:
    """The full averaged fp32 gradient of ``param``; None when no deepscale optimizer manages it."""
    access = _access(param)
    return None if access is None else access.get_full_grad(param)


def safe_get_full_optimizer_state(param, optim_state_key: str) -> Optional[torch.Tensor]:
    """The full optimizer state ``optim_state_key`` (e.g. ``"exp_avg"``) of ``param``, or None."""
    access = _access(param)
    return None if access is None else access.get_full_optimizer_state(param, optim_state_key)


def _require(param, what: str):
    access = _access(param)
    if access is None:
        raise ValueError(f"{what}: the parameter is not managed by a deepscale training optimizer (frozen, or "
                         "not passed to initialize())")
    return access


def safe_set_full_fp32_param(param, value: torch.Tensor) -> None:
    """Set the fp32 master weight (and the model weight) of ``param`` from the full ``value``."""
    _require(param, "safe_set_full_fp32_param").set_full_fp32(param, value)


def safe_set_full_grad(param, value: torch.Tensor) -> None:
    """Replace the averaged gradient of ``param`` (between backward and step) with ``value``."""
    _require(param, "safe_set_full_grad").set_full_grad(param, value)


def safe_set_full_optimizer_state(param, value: torch.Tensor, optim_state_key: str) -> None:
    """Set the optimizer state ``optim_state_key`` of ``param`` from the full ``value``."""
    _require(param, "safe_set_full_optimizer_state").set_full_optimizer_state(param, optim_state_key, value)
