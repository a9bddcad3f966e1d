"""``deepscale.checkpoint``: DeepSpeed's ``deepspeed.checkpoint`` path (checkpoint utilities).

The checkpoint code itself lives in ``deepscale.runtime.checkpoint``; this package re-exports
what DeepSpeed clients import from here.
"""
from deepscale.checkpoint.utils import clone_tensors_for_torch_save

__all__ = ["clone_tensors_for_torch_save"]
