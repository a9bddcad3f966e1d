"""ZeRO: partition math, the stage 1/2 training optimizer and memory estimators."""
from deepscale.runtime.zero.memory import (estimate_zero2_model_states_mem_needs,
                                           estimate_zero2_model_states_mem_needs_all_live, zero_model_state_bytes)
from deepscale.runtime.zero.stage_1_and_2 import ZeroOptimizer

__all__ = ["ZeroOptimizer", "estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_live",
           "zero_model_state_bytes"]
