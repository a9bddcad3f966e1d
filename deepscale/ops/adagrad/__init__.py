"""CPU Adagrad (compiled, with a PyTorch fallback)."""
from deepscale.ops.adagrad.cpu_adagrad import DeepScaleCPUAdagrad

DeepSpeedCPUAdagrad = DeepScaleCPUAdagrad  # DeepSpeed's name for the same optimizer

__all__ = ["DeepScaleCPUAdagrad", "DeepSpeedCPUAdagrad"]
