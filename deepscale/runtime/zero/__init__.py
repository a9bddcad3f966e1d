"""ZeRO: partition math, the stage 1/2 training optimizer and memory estimators.

The ZeRO-3 user tools (``Init``, ``GatheredParameters``, ...) also resolve here, as on DeepSpeed's
``deepspeed.runtime.zero`` path; they are imported on first use (their module imports this
package).
"""
import importlib

from deepscale.runtime.zero.memory import (estimate_zero2_model_states_mem_needs,
                                           estimate_zero2_model_states_mem_needs_all_live, zero_model_state_bytes)
from deepscale.runtime.zero.stage_1_and_2 import ZeroOptimizer

_ZERO3_NAMES = ("Init", "GatheredParameters", "ZeroParamStatus", "register_external_parameter",
                "unregister_external_parameter")

__all__ = ["ZeroOptimizer", "estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_live",
           "zero_model_state_bytes", *_ZERO3_NAMES]


def __getattr__(name):
    if name in _ZERO3_NAMES:
        return getattr(importlib.import_module("deepscale.runtime.zero.partition_parameters"), name)
    raise AttributeError(f"module 'deepscale.runtime.zero' has no attribute {name!r}")
