"""Device abstraction: ``get_accelerator()`` returns the CPU or CUDA implementation."""
from deepscale.accelerator.abstract_accelerator import Accelerator
from deepscale.accelerator.real_accelerator import get_accelerator, set_accelerator, is_current_accelerator_supported

__all__ = ["Accelerator", "get_accelerator", "set_accelerator", "is_current_accelerator_supported"]
