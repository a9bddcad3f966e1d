"""Adam optimizers: ``DeepScaleCPUAdam`` (compiled CPU) and ``FusedAdam`` (multi-tensor CUDA)."""
from deepscale.ops.adam.cpu_adam import DeepScaleCPUAdam
from deepscale.ops.adam.fused_adam import FusedAdam

# DeepSpeed's names, so `from deepspeed.ops.adam import ...` ports by changing the package.
DeepSpeedCPUAdam = DeepScaleCPUAdam

__all__ = ["DeepScaleCPUAdam", "DeepSpeedCPUAdam", "FusedAdam"]
