"""Optimizer construction: the config-driven factory and optimizers torch lacks (Lion)."""
from deepscale.runtime.optim.factory import (UNAVAILABLE_OPTIMIZER_NAMES, VALID_OPTIMIZER_NAMES, build_optimizer)
from deepscale.runtime.optim.lion import Lion

__all__ = ["build_optimizer", "Lion", "VALID_OPTIMIZER_NAMES", "UNAVAILABLE_OPTIMIZER_NAMES"]
