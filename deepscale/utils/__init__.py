"""Small helpers with no deepscale imports above this layer.

The ZeRO state accessors (``safe_get_full_*``) import torch, so they are resolved lazily:
``import deepscale.utils`` must stay torch-free for the launcher.
"""
import importlib

from deepscale.utils.logging import logger, log_dist, print_rank_0, warning_once
from deepscale.utils.repeating_loader import RepeatingLoader

_TENSOR_FRAGMENT_NAMES = ("safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state",
                          "safe_set_full_fp32_param", "safe_set_full_grad", "safe_set_full_optimizer_state")

__all__ = ["logger", "log_dist", "print_rank_0", "warning_once", "RepeatingLoader", *_TENSOR_FRAGMENT_NAMES]


# Submodules DeepSpeed clients reach as attributes (``deepspeed.utils.groups``).
_LAZY_SUBMODULES = ("groups", "zero_to_fp32", "tensor_fragment", "timer")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"deepscale.utils.{name}")
    if name in _TENSOR_FRAGMENT_NAMES:
        value = getattr(importlib.import_module("deepscale.utils.tensor_fragment"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepscale.utils' has no attribute {name!r}")
