"""Mixture of experts (DeepSpeed's ``deepspeed.moe``): the :class:`~deepscale.moe.layer.MoE` layer
(``layer.py``), its gates (``gating.py``), experts (``experts.py``) and expert-parallel dispatch
(``sharded_moe.py``), and the parameter helpers optimizers import (``utils.py``)."""
import importlib

_SUBMODULES = ("layer", "sharded_moe", "experts", "gating", "all_to_all", "utils", "hf")


def __getattr__(name):
    # ``deepscale.moe.layer.MoE`` works after ``import deepscale`` alone, as with DeepSpeed.
    if name in _SUBMODULES:
        return importlib.import_module(f"deepscale.moe.{name}")
    raise AttributeError(f"module 'deepscale.moe' has no attribute {name!r}")
