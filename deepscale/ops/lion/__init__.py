"""CPU Lion (compiled, with a PyTorch fallback)."""
from deepscale.ops.lion.cpu_lion import DeepScaleCPULion

__all__ = ["DeepScaleCPULion"]
