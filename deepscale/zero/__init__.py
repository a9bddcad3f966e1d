"""``deepscale.zero``: ZeRO-3 tools for user code (DeepSpeed's ``deepspeed.zero``).

``Init`` partitions parameters as a model is built, ``GatheredParameters`` gives temporary
access to whole parameters, ``register_external_parameter`` declares a parameter used by a
module that does not own it. See docs/zero3.md.
"""
from deepscale.runtime.zero.partition_parameters import (GatheredParameters, Init, ZeroParamStatus,
                                                         register_external_parameter, unregister_external_parameter)
from deepscale.runtime.zero.stage3.memory import estimate_zero3_model_states_mem_needs_all_live

__all__ = ["Init", "GatheredParameters", "ZeroParamStatus", "register_external_parameter",
           "unregister_external_parameter", "estimate_zero3_model_states_mem_needs_all_live"]
