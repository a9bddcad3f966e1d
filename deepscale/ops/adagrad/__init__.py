"""CPU Adagrad (compiled, with a PyTorch fallback)."""
from deepscale.ops.adagrad.cpu_adagrad import DeepScaleCPUAdagrad

__all__ = ["DeepScaleCPUAdagrad"]
