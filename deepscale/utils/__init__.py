"""Small helpers with no deepscale imports above this layer."""
from deepscale.utils.logging import logger, log_dist, print_rank_0, warning_once
from deepscale.utils.repeating_loader import RepeatingLoader
from deepscale.utils.tensor_fragment import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                                             safe_set_full_fp32_param, safe_set_full_grad, safe_set_full_optimizer_state)

__all__ = ["logger", "log_dist", "print_rank_0", "warning_once", "RepeatingLoader",
           "safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state",
           "safe_set_full_fp32_param", "safe_set_full_grad", "safe_set_full_optimizer_state"]
