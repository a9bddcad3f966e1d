"""``DeepScaleCPULion``: the fused, vectorised, multi-threaded CPU Lion."""
from deepscale.ops.cpu_optimizer_base import CPUOptimizerBase


class DeepScaleCPULion(CPUOptimizerBase):
    """Lion (Chen et al., 2023) over CPU parameters (drop-in for ``DeepSpeedCPULion``).

    Args:
        model_params: parameters or parameter groups.
        lr: learning rate. Default 1e-3.
        betas: interpolation for the update direction and for the momentum. Default (0.9, 0.999).
        weight_decay: decoupled weight decay. Default 0.
        fp32_optimizer_states: fp32 momentum for half-precision parameters. Default True.
        num_threads: OpenMP threads; None uses ``torch.get_num_threads()``. Default None.
    """

    OP_NAME = "cpu_lion"
    STATE_NAMES = ("exp_avg",)

    def __init__(self, model_params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0, fp32_optimizer_states=True,
                 num_threads=None):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        super().__init__(model_params, defaults, fp32_optimizer_states, num_threads)

    def _kernel_step(self, slots, num_values, group, step, num_threads):
        beta1, beta2 = group["betas"]
        return self._op.ds_lion_step(slots, num_values, step, group["lr"], beta1, beta2, group["weight_decay"],
                                     num_threads)

    def _torch_step(self, param, grad, states, group, step):
        (exp_avg,) = states
        beta1, beta2 = group["betas"]
        param.mul_(1.0 - group["lr"] * group["weight_decay"])
        direction = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1)
        param.add_(direction.sign_(), alpha=-group["lr"])
        exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
