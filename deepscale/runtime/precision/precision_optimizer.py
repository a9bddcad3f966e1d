"""Wraps a torch optimizer with fp32 master weights, loss-scale handling and clipping.

Note: master weights. With fp16 or bf16 the model's parameters are stored in the low
precision, but the optimizer updates fp32 copies ("master weights", Micikevicius et al. 2018,
"Mixed Precision Training") and the result is rounded back into the model after each step.
The masters replace the model parameters inside the optimizer's ``param_groups``, so lr
schedules and user code that edit ``param_groups`` keep working. With fp32 models the masters
are the model parameters themselves and no copy is made.

The step pipeline, in order: the engine puts the averaged gradients on the masters; one norm
over all gradients gives both the overflow test (a non-finite norm skips the step, at every
precision) and the clipping coefficient (from the unscaled norm); one multiply unscales and
clips; the wrapped optimizer steps; masters are copied back into the model. The stage
optimizers drive this through ``runtime/training_optimizer.py``.
"""
import logging
import math
from typing import Dict, List, Optional

import torch

from deepscale.runtime.base_optimizer import DeepSpeedOptimizer
from deepscale.utils.logging import log_dist

# Note: an accurate norm. torch's fp32 norm of one large tensor accumulates in fp32 and drifts:
# over a 480K-element gradient buffer it was 2e-5 (relative) off the float64 value, enough to
# move a clipped SGD step visibly. Norms of chunks of at most NORM_CHUNK elements stay within
# about 1e-7, and their squares are summed in float64 (no float64 copy of the gradients).
NORM_CHUNK = 1 << 15


def squared_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every element of ``tensors`` as a 0-dim float64 tensor (see Note above)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    pieces = [chunk for t in tensors for chunk in t.reshape(-1).split(NORM_CHUNK)]
    norms = torch.stack(torch._foreach_norm(pieces, 2.0)).double()
    return norms.pow(2).sum()


class PrecisionOptimizer(DeepSpeedOptimizer):
    """Drives one optimizer step with mixed precision, loss scaling and clipping.

    Args:
        optimizer: a torch optimizer whose ``param_groups`` hold the model parameters.
        model_dtype: dtype the model parameters will be stored in (float32, float16, bfloat16).
        loss_scaler: a loss scaler (``loss_scale``, ``update_scale(overflow)``) or None.
        clip_grad: max global gradient norm; 0 disables clipping. Default 0.
        offload: an object with ``step_grads()`` and ``step()`` that holds the gradients and runs
            the update instead of ``optimizer.step()`` (ZeRO-Offload, ``runtime/offload``). Default None.

    Must be built while the model parameters are still fp32 so masters keep full precision.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model_dtype: torch.dtype = torch.float32,
                 loss_scaler=None, clip_grad: float = 0.0, offload=None):
        self.optimizer = optimizer
        self.offload = offload
        self.model_dtype = model_dtype
        self.loss_scaler = loss_scaler
        self.clip_grad = float(clip_grad or 0.0)
        self.uses_master_copies = model_dtype != torch.float32
        self.model_params: List[torch.nn.Parameter] = []
        self.master_params: List[torch.Tensor] = []
        self._master_of: Dict[torch.nn.Parameter, torch.Tensor] = {}
        self._install_masters()
        self._grad_norm: Optional[torch.Tensor] = None
        self.last_overflow = False

    def _install_masters(self) -> None:
        for group in self.optimizer.param_groups:
            masters = []
            for param in group["params"]:
                if self.uses_master_copies:
                    master = torch.nn.Parameter(param.detach().clone().float(), requires_grad=param.requires_grad)
                    if param in self.optimizer.state:
                        self.optimizer.state[master] = self.optimizer.state.pop(param)
                else:
                    master = param
                self.model_params.append(param)
                self.master_params.append(master)
                self._master_of[param] = master
                masters.append(master)
            group["params"] = masters

    # --- optimizer face -------------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def loss_scale(self) -> float:
        return float(self.loss_scaler.loss_scale) if self.loss_scaler is not None else 1.0

    cur_scale = loss_scale

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master of a model parameter (the parameter itself for fp32 models)."""
        return self._master_of[param]

    def has_param(self, param: torch.nn.Parameter) -> bool:
        return param in self._master_of

    # --- the step -------------------------------------------------------------------------
    def set_master_grad(self, param: torch.nn.Parameter, grad: Optional[torch.Tensor]) -> None:
        """Attach ``grad`` (any float dtype, shaped like ``param``) to ``param``'s master."""
        master = self._master_of[param]
        if grad is not None and grad.dtype != master.dtype:
            grad = grad.to(master.dtype)
        master.grad = grad

    def _master_grads(self) -> List[torch.Tensor]:
        return [m.grad for m in self.master_params if m.grad is not None]

    def compute_grad_norm(self, grads: List[torch.Tensor]) -> torch.Tensor:
        """Global L2 norm of ``grads`` as a 0-dim fp32 tensor (inf/nan on overflow)."""
        return squared_norm(grads).sqrt().float()

    def step(self, grad_norm: Optional[torch.Tensor] = None) -> bool:
        """Unscale, clip, check the norm and step. Returns True if the step was applied.

        A non-finite norm (an inf or nan anywhere in the gradients) skips the step at every
        precision and says so: fp16 also backs its loss scale off; fp32 and bf16 change no scale.

        Args:
            grad_norm: the global norm of the (still loss-scaled) master gradients if the
                caller already knows it (e.g. over all ranks); computed here otherwise.
        """
        grads = self.offload.step_grads() if self.offload is not None else self._master_grads()
        scale = self.loss_scale
        if grad_norm is None:
            grad_norm = self.compute_grad_norm(grads)
        self._grad_norm = grad_norm.detach() / scale
        # One host read of the norm per step: the skip decision needs it.
        norm = float(grad_norm)
        overflow = not math.isfinite(norm)
        self.last_overflow = overflow
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(overflow)
        if overflow:
            if self.loss_scaler is None or not self.loss_scaler.dynamic:  # a dynamic scaler logs its own backoff
                log_dist(f"gradient norm is {norm}: skipping this optimizer step (weights, optimizer state and lr "
                         f"schedule unchanged); look for inf/nan in the loss, the inputs or the model",
                         ranks=[0], level=logging.WARNING)
            self._grad_norm = None
            self.zero_grad()
            return False
        coef = 1.0 / scale
        # Clipping compares the unscaled norm with the threshold (the loss scale is not a gradient).
        if self.clip_grad > 0 and norm / scale > self.clip_grad:
            coef *= self.clip_grad / (norm / scale + 1e-6)
        if coef != 1.0 and grads:
            torch._foreach_mul_(grads, coef)
        if self.offload is not None:
            self.offload.step()
        else:
            self.optimizer.step()
        self.copy_masters_to_model()
        return True

    @property
    def overflow(self) -> bool:
        """True when the last step was skipped for a non-finite gradient (DeepSpeed's name; Hugging
        Face Accelerate reads it as ``step_was_skipped``)."""
        return self.last_overflow

    @property
    def last_grad_norm(self) -> Optional[float]:
        """Global gradient norm (unscaled, before clipping) of the last step; None after an overflow."""
        return None if self._grad_norm is None else float(self._grad_norm)

    @torch.no_grad()
    def copy_masters_to_model(self) -> None:
        if not self.uses_master_copies:
            return
        torch._foreach_copy_(self.model_params, self.master_params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for master in self.master_params:
            master.grad = None
        if self.uses_master_copies:
            for param in self.model_params:
                param.grad = None

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimizer state, the loss scaler and (for fp16/bf16) the fp32 masters."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        if self.uses_master_copies:
            state["fp32_master_params"] = [m.detach().clone() for m in self.master_params]
        return state

    def load_state_dict(self, state: dict, load_optimizer_states: bool = True) -> None:
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.loss_scaler is not None and "loss_scaler" in state:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        masters = state.get("fp32_master_params")
        with torch.no_grad():
            if self.uses_master_copies and masters is not None:
                if len(masters) != len(self.master_params):
                    raise ValueError(f"checkpoint holds {len(masters)} fp32 master parameters but the "
                                     f"optimizer has {len(self.master_params)}; was it saved from another model?")
                for master, saved in zip(self.master_params, masters):
                    master.copy_(saved)
                self.copy_masters_to_model()
            elif self.uses_master_copies:
                self.refresh_masters_from_model()

    @torch.no_grad()
    def refresh_masters_from_model(self) -> None:
        """Re-seed the masters from the model (after the model's weights were replaced)."""
        if self.uses_master_copies:
            for master, param in zip(self.master_params, self.model_params):
                master.copy_(param.float())

    def __repr__(self) -> str:
        return (f"PrecisionOptimizer({type(self.optimizer).__name__}, model_dtype={self.model_dtype}, "
                f"loss_scaler={type(self.loss_scaler).__name__ if self.loss_scaler else None}, "
                f"clip_grad={self.clip_grad})")
