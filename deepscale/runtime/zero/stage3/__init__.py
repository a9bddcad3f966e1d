"""ZeRO stage 3: partitioned parameters, gather/release hooks, the stage-3 training optimizer."""
from deepscale.runtime.zero.stage3.memory import (estimate_zero3_model_states_mem_needs,
                                                  estimate_zero3_model_states_mem_needs_all_live)
from deepscale.runtime.zero.stage3.optimizer import Stage3Optimizer, stage3_optimizer_kwargs
from deepscale.runtime.zero.stage3.states import ZeroParamStatus

__all__ = ["Stage3Optimizer", "stage3_optimizer_kwargs", "ZeroParamStatus", "estimate_zero3_model_states_mem_needs",
           "estimate_zero3_model_states_mem_needs_all_live"]
