"""``FusedAdam``: multi-tensor Adam/AdamW, one CUDA kernel launch per dtype group.

On CUDA parameters with the ``fused_adam`` op built, each (device, dtype) group of a
parameter group is updated by a single launch of the multi-tensor kernel (fp32 math, fp32
states, fp32/bf16/fp16 parameters). Elsewhere (CPU parameters, or the op unavailable) the
same class falls back to torch's fused Adam kernels, or torch's foreach ops where the fused
kernel does not apply (bias correction off, or half parameters with fp32 states).
"""
import math

import torch

from deepscale.ops.cpu_optimizer_base import load_keeping_state_dtype, step_tensor
from deepscale.ops.op_loader import load_op

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


class FusedAdam(torch.optim.Optimizer):
    """Adam/AdamW that updates many tensors per kernel launch (drop-in for DeepSpeed's ``FusedAdam``).

    Args:
        params: parameters or parameter groups.
        lr: learning rate. Default 1e-3.
        bias_correction: apply Adam's bias correction. Default True.
        betas: running-average coefficients. Default (0.9, 0.999).
        eps: denominator term for numerical stability. Default 1e-8.
        adam_w_mode: decoupled weight decay (AdamW) when True, L2 in the gradient when False. Default True.
        weight_decay: weight decay coefficient. Default 0.
        amsgrad: not supported; must be False.
        set_grad_none: ``zero_grad()`` sets gradients to None by default. Default True.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by FusedAdam; allowed: False")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = bool(adam_w_mode)
        self.set_grad_none = set_grad_none
        self._op = None
        self._op_tried = False

    def zero_grad(self, set_to_none=None):
        """Clear gradients; ``set_to_none`` defaults to the constructor's ``set_grad_none``."""
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    def load_state_dict(self, state_dict):
        """Load a state dict of FusedAdam or of torch's Adam/AdamW (same state names); moments stay fp32."""
        load_keeping_state_dtype(self, state_dict)

    def _cuda_op(self):
        if not self._op_tried:
            self._op_tried = True
            self._op = load_op("fused_adam")
        return self._op

    @torch.no_grad()
    def step(self, closure=None):
        """Run one optimizer step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("FusedAdam does not support sparse gradients")
                if p.dtype not in _SUPPORTED:
                    raise TypeError(f"FusedAdam supports float32, bfloat16 and float16 parameters, got {p.dtype}")
                step = self._next_step(self.state[p], p, group)
                buckets.setdefault((p.device, p.dtype, step), []).append(p)
            if not buckets:
                continue
            group["step"] = max(step for _, _, step in buckets)
            for (device, _dtype, step), params in buckets.items():
                self._update_bucket(group, device, params, step)
        return loss

    @staticmethod
    def _next_step(state, param, group):
        """Create or advance ``param``'s state; returns its step number after this step.

        The count is kept per parameter as a 0-dim float32 tensor, as torch's Adam keeps it,
        so a checkpoint of either optimizer resumes the other. State loaded from a checkpoint
        that counted per group (``group["step"]``) starts from that count.
        """
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["step"] = step_tensor(0)
        elif not torch.is_tensor(state.get("step")):
            state["step"] = step_tensor(state.get("step", group.get("step", 0)))
        state["step"] += 1
        return int(state["step"])

    def _update_bucket(self, group, device, params, step):
        grads = [p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype) for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        beta1, beta2 = group["betas"]
        op = self._cuda_op() if device.type == "cuda" else None
        if op is not None and all(p.is_contiguous() for p in params):
            op.fused_adam_step(params, [g.contiguous() for g in grads], exp_avgs, exp_avg_sqs, step,
                               group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                               group["bias_correction"], self.adam_w_mode)
            return
        self._torch_update(group, params, grads, exp_avgs, exp_avg_sqs, step)

    def _torch_update(self, group, params, grads, exp_avgs, exp_avg_sqs, step):
        """torch's fused kernel for fp32 parameters with bias correction, foreach math otherwise."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        half = params[0].dtype != torch.float32
        p32 = [p.float() for p in params] if half else list(params)
        g32 = [g.float() for g in grads] if half else list(grads)
        fused = torch._fused_adamw_ if self.adam_w_mode else torch._fused_adam_
        if group["bias_correction"] and hasattr(torch, "_fused_adamw_"):
            steps = [torch.tensor(float(step)) for _ in p32]
            fused(p32, g32, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                  eps=eps, amsgrad=False, maximize=False)
        else:
            if wd and self.adam_w_mode:
                torch._foreach_mul_(p32, 1.0 - lr * wd)
            elif wd:
                g32 = torch._foreach_add(g32, p32, alpha=wd)
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, g32, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, g32, g32, value=1.0 - beta2)
            bias1 = 1.0 - beta1 ** step if group["bias_correction"] else 1.0
            bias2 = 1.0 - beta2 ** step if group["bias_correction"] else 1.0
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(p32, exp_avgs, denom, value=-lr / bias1)
        if half:
            for p, updated in zip(params, p32):
                p.copy_(updated)
