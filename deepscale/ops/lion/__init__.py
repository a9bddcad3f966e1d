"""CPU Lion (compiled, with a PyTorch fallback)."""
from deepscale.ops.lion.cpu_lion import DeepScaleCPULion

DeepSpeedCPULion = DeepScaleCPULion  # DeepSpeed's name for the same optimizer

__all__ = ["DeepScaleCPULion", "DeepSpeedCPULion"]
