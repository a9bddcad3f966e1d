"""``DeepScaleCPUAdagrad``: the fused, vectorised, multi-threaded CPU Adagrad."""
from deepscale.ops.cpu_optimizer_base import CPUOptimizerBase


class DeepScaleCPUAdagrad(CPUOptimizerBase):
    """Adagrad over CPU parameters (drop-in for ``DeepSpeedCPUAdagrad``).

    State per parameter: ``sum`` (the running sum of squared gradients) and ``step``, as in
    ``torch.optim.Adagrad``.

    Args:
        model_params: parameters or parameter groups.
        lr: learning rate. Default 1e-2.
        eps: added to the denominator for numerical stability. Default 1e-10.
        weight_decay: L2 penalty added to the gradient. Default 0.
        amsgrad: not supported; must be False.
        fp32_optimizer_states: fp32 state for half-precision parameters. Default True.
        num_threads: OpenMP threads; None uses ``torch.get_num_threads()``. Default None.
    """

    OP_NAME = "cpu_adagrad"
    # torch.optim.Adagrad's name for the sum of squared gradients (DeepSpeed calls it
    # exp_avg_sq), so checkpoints move between the two implementations.
    STATE_NAMES = ("sum",)

    def __init__(self, model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False, fp32_optimizer_states=True,
                 num_threads=None):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by DeepScaleCPUAdagrad; allowed: False")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, amsgrad=False)
        super().__init__(model_params, defaults, fp32_optimizer_states, num_threads)

    def _kernel_step(self, slots, num_values, group, step, num_threads):
        return self._op.ds_adagrad_step(slots, num_values, step, group["lr"], group["eps"], group["weight_decay"],
                                        num_threads)

    def _torch_step(self, param, grad, states, group, step):
        (state_sum,) = states
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        state_sum.addcmul_(grad, grad, value=1.0)
        param.addcdiv_(grad, state_sum.sqrt().add_(group["eps"]), value=-group["lr"])
