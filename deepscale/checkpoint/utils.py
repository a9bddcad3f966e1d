"""``deepscale.checkpoint.utils``: re-exports for ``from deepspeed.checkpoint.utils import ...``."""
from deepscale.runtime.checkpoint.tensor_copies import clone_tensors_for_torch_save

__all__ = ["clone_tensors_for_torch_save"]
