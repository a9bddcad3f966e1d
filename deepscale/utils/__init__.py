"""Small helpers with no deepscale imports above this layer."""
from deepscale.utils.logging import logger, log_dist, print_rank_0, warning_once
from deepscale.utils.repeating_loader import RepeatingLoader

__all__ = ["logger", "log_dist", "print_rank_0", "warning_once", "RepeatingLoader"]
