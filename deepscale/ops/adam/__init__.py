"""Adam optimizers: ``DeepScaleCPUAdam`` (compiled CPU) and ``FusedAdam`` (multi-tensor CUDA)."""
from deepscale.ops.adam.cpu_adam import DeepScaleCPUAdam
from deepscale.ops.adam.fused_adam import FusedAdam

__all__ = ["DeepScaleCPUAdam", "FusedAdam"]
