"""``DeepScaleCPUAdam``: the fused, vectorised, multi-threaded CPU Adam/AdamW."""
import math

from deepscale.ops.cpu_optimizer_base import CPUOptimizerBase


def _check_betas(betas):
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


class DeepScaleCPUAdam(CPUOptimizerBase):
    """Adam (or AdamW) over CPU parameters, the optimizer ZeRO-Offload runs.

    Drop-in for ``DeepSpeedCPUAdam``. fp32, bf16 and fp16 parameters; fp32 states.

    Args:
        model_params: parameters or parameter groups.
        lr: learning rate. Default 1e-3.
        bias_correction: apply Adam's bias correction. Default True.
        betas: coefficients of the running averages of gradient and its square. Default (0.9, 0.999).
        eps: added to the denominator for numerical stability. Default 1e-8.
        weight_decay: weight decay coefficient. Default 0.
        amsgrad: not supported; must be False.
        adamw_mode: True for decoupled weight decay (AdamW), False for L2 added to the gradient
            (Adam). Default True.
        fp32_optimizer_states: fp32 states for half-precision parameters. Default True.
        num_threads: OpenMP threads; None uses ``torch.get_num_threads()``. Default None.
    """

    OP_NAME = "cpu_adam"
    STATE_NAMES = ("exp_avg", "exp_avg_sq")

    def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adamw_mode=True, fp32_optimizer_states=True, num_threads=None):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by DeepScaleCPUAdam; allowed: False")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, weight_decay={weight_decay}")
        _check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, amsgrad=False)
        self.adam_w_mode = bool(adamw_mode)
        super().__init__(model_params, defaults, fp32_optimizer_states, num_threads)

    def _kernel_step(self, slots, num_values, group, step, num_threads):
        beta1, beta2 = group["betas"]
        return self._op.ds_adam_step(slots, num_values, step, group["lr"], beta1, beta2, group["eps"],
                                     group["weight_decay"], int(bool(group["bias_correction"])),
                                     int(self.adam_w_mode), num_threads)

    def _torch_step(self, param, grad, states, group, step):
        exp_avg, exp_avg_sq = states
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        if wd and not self.adam_w_mode:
            grad = grad.add(param, alpha=wd)
        elif wd:
            param.mul_(1.0 - lr * wd)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias1 = 1.0 - beta1 ** step if group["bias_correction"] else 1.0
        bias2 = 1.0 - beta2 ** step if group["bias_correction"] else 1.0
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bias2)).add_(group["eps"])
        param.addcdiv_(exp_avg, denom, value=-lr / bias1)
