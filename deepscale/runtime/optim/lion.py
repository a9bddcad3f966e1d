"""Lion optimizer (EvoLved Sign Momentum).

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms" (arXiv:2302.06675).
Per step, with gradient g and momentum m:

    update = sign(beta1 * m + (1 - beta1) * g)
    p      = p * (1 - lr * weight_decay) - lr * update      (decoupled weight decay)
    m      = beta2 * m + (1 - beta2) * g

Only one state tensor per parameter (half of Adam's), and every coordinate moves by
exactly lr, so Lion wants a 3-10x smaller lr and a 3-10x larger weight decay than AdamW.
"""
import torch


class Lion(torch.optim.Optimizer):
    """Lion as a ``torch.optim.Optimizer``.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr (float): learning rate. Default 1e-4.
        betas (tuple of 2 floats): (beta1, beta2): interpolation for the update direction
            and momentum decay. Default (0.9, 0.99), the paper's.
        weight_decay (float): decoupled weight decay. Default 0.0.
        foreach (bool or None): update all tensors of a group with multi-tensor kernels;
            None picks them when available. Default None.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=None):
        if not isinstance(lr, (int, float)) or lr < 0.0:
            raise ValueError(f"Lion: lr must be a number >= 0, got {lr!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"Lion: betas must be two numbers in [0, 1), got {betas!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0.0:
            raise ValueError(f"Lion: weight_decay must be a number >= 0, got {weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def _group_tensors(self, group):
        params, grads, moments = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lion does not support sparse gradients")
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            moments.append(state["exp_avg"])
        return params, grads, moments

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, moments = self._group_tensors(group)
            if not params:
                continue
            use_foreach = group["foreach"]
            if use_foreach is None:
                use_foreach = hasattr(torch, "_foreach_lerp") and len({p.device for p in params}) == 1
            update_fn = _lion_foreach if use_foreach else _lion_single_tensor
            beta1, beta2 = group["betas"]
            update_fn(params, grads, moments, float(group["lr"]), beta1, beta2, group["weight_decay"])
        return loss


def _lion_single_tensor(params, grads, moments, lr, beta1, beta2, weight_decay):
    for p, g, m in zip(params, grads, moments):
        direction = torch.lerp(m, g, 1.0 - beta1).sign_()
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(direction, alpha=-lr)
        m.lerp_(g, 1.0 - beta2)


def _lion_foreach(params, grads, moments, lr, beta1, beta2, weight_decay):
    # lerp(m, g, 1 - beta1) == beta1 * m + (1 - beta1) * g, in one kernel per tensor list.
    directions = torch._foreach_lerp(moments, grads, 1.0 - beta1)
    torch._foreach_sign_(directions)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, directions, alpha=-lr)
    torch._foreach_lerp_(moments, grads, 1.0 - beta2)
