"""Python faces of deepscale's compiled kernels, each with a pure-PyTorch fallback.

Submodules: ``adam`` (DeepScaleCPUAdam, FusedAdam), ``adagrad`` (DeepScaleCPUAdagrad),
``lion`` (DeepScaleCPULion), ``aio`` (async tensor file I/O), ``attention`` (fused attention). ``load_op`` returns a compiled
op or None (after one warning naming the op and the reason).
"""
from deepscale.ops.op_loader import load_op, op_status

__all__ = ["load_op", "op_status"]
