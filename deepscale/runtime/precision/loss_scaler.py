"""Loss scaling for fp16 training: static and dynamic scalers and an overflow check.

fp16 gradients underflow to zero when small; multiplying the loss by a scale S before
backward lifts them into range, and the optimizer divides S back out. A dynamic scaler
(Micikevicius et al. 2018, "Mixed Precision Training") starts high, shrinks S when the
gradients overflow (that step is skipped) and grows it again after ``scale_window``
overflow-free steps.

Note (hysteresis): with ``delayed_shift`` (DeepSpeed's ``hysteresis``) H > 1, the first H-1
overflows since the counter was last refilled only use up the counter; the scale shrinks
on the H-th. The counter is refilled when the scale grows, or after every clean step when
``consecutive_hysteresis`` is set (then only H overflows in a row shrink the scale).

Note (growth rule): the scale grows on a clean step when
``(cur_iter - last_overflow_iter) % scale_window == 0``, i.e. after every ``scale_window``
consecutive clean steps (DeepSpeed's long-standing rule).
"""
import logging
import math

import torch

from deepscale.utils.logging import log_dist

INITIAL_LOSS_SCALE = "init_scale"
SCALE_WINDOW = "scale_window"
DELAYED_SHIFT = "delayed_shift"
CONSECUTIVE_HYSTERESIS = "consecutive_hysteresis"
MIN_LOSS_SCALE = "min_scale"


def has_inf_or_nan(tensors) -> bool:
    """True if any element of any tensor is inf or nan.

    One max-abs reduction per tensor list (``torch._foreach_norm`` with ord=inf: a
    multi-tensor kernel on GPU) and a single host sync per device. Max-abs cannot overflow
    on large finite fp16 values the way a sum or 2-norm can, and propagates nan.

    Args:
        tensors: a tensor or an iterable of tensors; ``None`` entries are skipped.
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    by_device = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            by_device.setdefault(t.device, []).append(t.detach())
    for group in by_device.values():
        norms = torch._foreach_norm(group, ord=math.inf) if hasattr(torch, "_foreach_norm") else \
            [torch.linalg.vector_norm(t, ord=math.inf) for t in group]
        # float32 so a half/bf16 norm of inf stays comparable; isfinite catches inf and nan.
        if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return True
    return False


def _check_positive(name, value, integer=False):
    kinds = (int, ) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


class _LossScalerBase:
    """What every scaler offers: the current scale and scaling of a loss."""

    dynamic = False

    def __init__(self, scale):
        self.cur_scale = float(scale)

    @property
    def loss_scale(self):
        """The scale the next loss is multiplied by."""
        return self.cur_scale

    def scale_loss(self, loss):
        """``loss * loss_scale`` (call backward on the result)."""
        return loss * self.loss_scale

    def backward(self, loss, retain_graph=False):
        """Backward of the scaled loss."""
        self.scale_loss(loss).backward(retain_graph=retain_graph)

    @staticmethod
    def has_overflow(params):
        """True if any ``param.grad`` holds inf or nan."""
        return has_inf_or_nan([p.grad for p in params])

    def update_scale(self, overflow: bool):
        """Record whether the step's gradients overflowed (a static scale ignores it)."""

    def state_dict(self):
        return {"cur_scale": self.cur_scale}

    def load_state_dict(self, state_dict):
        self.cur_scale = float(state_dict["cur_scale"])


class StaticLossScaler(_LossScalerBase):
    """A fixed loss scale (``fp16.loss_scale`` > 0).

    Args:
        scale (float): the loss scale. Default 1.0.
    """

    def __init__(self, scale=1.0):
        super().__init__(_check_positive("fp16.loss_scale", scale))


class DynamicLossScaler(_LossScalerBase):
    """A loss scale that shrinks on overflow and grows after a window of clean steps.

    Args:
        init_scale (float): starting scale. Default 2**16.
        scale_factor (float): shrink/grow factor, > 1. Default 2.0.
        scale_window (int): clean steps between growths. Default 1000.
        min_scale (float): the scale never goes below this. Default 1.0.
        delayed_shift (int): hysteresis: overflows tolerated before shrinking (see the Note
            at the top of this module). Default 1.
        consecutive_hysteresis (bool): refill the hysteresis after every clean step. Default False.
        raise_error_at_min_scale (bool): raise instead of warning when gradients overflow
            with the scale already at ``min_scale``. Default False.
    """

    dynamic = True

    def __init__(self, init_scale=2**16, scale_factor=2.0, scale_window=1000, min_scale=1.0, delayed_shift=1,
                 consecutive_hysteresis=False, raise_error_at_min_scale=False):
        super().__init__(_check_positive("init_scale", init_scale))
        self.scale_factor = float(_check_positive("scale_factor", scale_factor))
        if self.scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor!r}")
        self.scale_window = _check_positive("scale_window", scale_window, integer=True)
        self.min_scale = float(_check_positive("min_scale", min_scale))
        self.delayed_shift = _check_positive("delayed_shift", delayed_shift, integer=True)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_error_at_min_scale = bool(raise_error_at_min_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.cur_hysteresis = self.delayed_shift

    def update_scale(self, overflow: bool):
        """Apply the scaling rules for one step whose gradients did (not) overflow."""
        if overflow:
            self._on_overflow()
        else:
            self._on_clean_step()
        self.cur_iter += 1

    def _on_overflow(self):
        if self.delayed_shift == 1 or self.cur_hysteresis == 1:
            if self.cur_scale <= self.min_scale:
                self._report_stuck_at_min_scale()
            next_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            log_dist(f"gradient overflow: skipping step; loss scale {self.cur_scale:g} -> {next_scale:g}", ranks=[0])
            self.cur_scale = next_scale
        else:
            log_dist(f"gradient overflow: skipping step; loss scale stays {self.cur_scale:g}, hysteresis "
                     f"{self.cur_hysteresis} -> {self.cur_hysteresis - 1}", ranks=[0])
            self.cur_hysteresis -= 1
        self.last_overflow_iter = self.cur_iter

    def _on_clean_step(self):
        if self.consecutive_hysteresis:
            self.cur_hysteresis = self.delayed_shift
        if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
            if not self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            self.cur_scale *= self.scale_factor

    def _report_stuck_at_min_scale(self):
        message = (f"loss scale is at its minimum ({self.min_scale:g}) and gradients still overflow; the step is "
                   f"skipped (iteration {self.cur_iter}). Training is not making progress: lower the learning "
                   f"rate, check the model for inf/nan, or use bf16")
        if self.raise_error_at_min_scale:
            raise RuntimeError(message)
        log_dist(message, ranks=[0], level=logging.WARNING)

    def state_dict(self):
        """Scale and counters. Hyperparameters are not restored by ``load_state_dict`` so a
        resumed run may change e.g. the window through its config."""
        return {
            "cur_scale": self.cur_scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
            "scale_factor": self.scale_factor,
            "scale_window": self.scale_window,
            "min_scale": self.min_scale,
            "delayed_shift": self.delayed_shift,
            "consecutive_hysteresis": self.consecutive_hysteresis,
        }

    def load_state_dict(self, state_dict):
        self.cur_scale = float(state_dict["cur_scale"])
        self.cur_iter = int(state_dict["cur_iter"])
        self.last_overflow_iter = int(state_dict["last_overflow_iter"])
        self.cur_hysteresis = min(int(state_dict["cur_hysteresis"]), self.delayed_shift)


_FP16_DEFAULTS = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "consecutive_hysteresis": False,
    "min_loss_scale": 1,
    "raise_error_at_min_scale": False,
}


def build_loss_scaler(fp16_cfg):
    """The scaler an ``fp16`` config section asks for.

    Args:
        fp16_cfg: an object (or dict) with DeepSpeed's fp16 keys: ``loss_scale`` (> 0: static
            scale; 0: dynamic), ``initial_scale_power`` (dynamic start 2**power),
            ``loss_scale_window``, ``hysteresis``, ``consecutive_hysteresis``, ``min_loss_scale``,
            ``raise_error_at_min_scale``. Missing ones take DeepSpeed's defaults (0, 16, 1000,
            2, False, 1, False).
    """
    def get(key):
        if isinstance(fp16_cfg, dict):
            return fp16_cfg.get(key, _FP16_DEFAULTS[key])
        return getattr(fp16_cfg, key, _FP16_DEFAULTS[key])

    loss_scale = get("loss_scale")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or loss_scale < 0:
        raise ValueError(f"fp16.loss_scale must be 0 (dynamic) or a positive number, got {loss_scale!r}")
    if loss_scale > 0:
        return StaticLossScaler(loss_scale)
    power = get("initial_scale_power")
    if isinstance(power, bool) or not isinstance(power, int) or not 0 <= power <= 64:
        raise ValueError(f"fp16.initial_scale_power must be an integer in [0, 64], got {power!r}")
    names = {"scale_window": "fp16.loss_scale_window", "min_scale": "fp16.min_loss_scale",
             "delayed_shift": "fp16.hysteresis"}
    try:
        return DynamicLossScaler(init_scale=2.0**power, scale_window=get("loss_scale_window"),
                                 min_scale=get("min_loss_scale"), delayed_shift=get("hysteresis"),
                                 consecutive_hysteresis=get("consecutive_hysteresis"),
                                 raise_error_at_min_scale=get("raise_error_at_min_scale"))
    except ValueError as err:
        # Re-word the constructor argument as the config key the user wrote.
        message = str(err)
        for arg, key in names.items():
            if message.startswith(arg + " "):
                message = key + message[len(arg):]
        raise ValueError(message) from err
