"""Mixed-precision sections: ``fp16``, ``bf16`` (alias ``bfloat16``), ``amp``,
``torch_autocast`` and ``data_types``."""
from typing import List, Optional

from pydantic import Field

from deepscale.config.base import ConfigSection, FreeFormSection
from deepscale.config.fields import Bool, DtypeName, Float, Int


class FP16Config(ConfigSection):
    """``fp16``: half-precision training with loss scaling.

    Attributes:
        enabled: train in fp16. Default False.
        auto_cast: cast floating-point inputs of the model to fp16. Default False.
        loss_scale: 0 selects dynamic loss scaling; a value > 0 is a static scale. Default 0.
        initial_scale_power: dynamic scaling starts at ``2**initial_scale_power``. Default 16.
        loss_scale_window: overflow-free steps before the dynamic scale is raised. Default 1000.
        hysteresis: overflows tolerated before the dynamic scale is lowered. Default 2.
        consecutive_hysteresis: refill the hysteresis budget after every
            overflow-free step, so only consecutive overflows lower the scale. Default False.
        min_loss_scale: lower bound of the dynamic scale. Default 1.
        fp16_master_weights_and_grads: keep master weights and gradients in fp16
            (DeepSpeed allows this with ZeRO 1-3 only). Default False.
        raise_error_at_min_scale: deepscale extension. When the dynamic scale is
            already at ``min_loss_scale`` and a step still overflows, False
            (default) skips the step and keeps training; True stops with an error.
    """

    enabled: Bool = False
    auto_cast: Bool = False
    loss_scale: Float = Field(0.0, ge=0)
    initial_scale_power: Int = Field(16, ge=0)
    loss_scale_window: Int = Field(1000, ge=1)
    hysteresis: Int = Field(2, ge=1)
    consecutive_hysteresis: Bool = False
    min_loss_scale: Float = Field(1.0, gt=0)
    fp16_master_weights_and_grads: Bool = False
    raise_error_at_min_scale: Bool = False

    @property
    def dynamic_loss_scale(self) -> bool:
        """True when ``loss_scale`` is 0, i.e. the scale adapts to overflows."""
        return self.loss_scale == 0

    @property
    def initial_dynamic_scale(self) -> float:
        """The first dynamic loss scale, ``2**initial_scale_power``."""
        return float(2 ** self.initial_scale_power)


class BF16Config(ConfigSection):
    """``bf16`` (also accepted as ``bfloat16``): bfloat16 training.

    Attributes:
        enabled: train in bf16. Default False.
        immediate_grad_update: apply gradients to the fp32 master copy as soon
            as they are reduced instead of at the accumulation boundary. Default False.
        check_grad_overflow: check gradients for inf/nan before stepping. Default False.
            Accepted for compatibility: deepscale always skips (and logs) a step whose global
            gradient norm is not finite, at every precision.
        bf16_master_weights_and_grads: keep master weights and gradients in bf16
            (DeepSpeed allows this with ZeRO 1-3 only). Default False.
        bf16_optimizer_states: keep optimizer states in bf16 (requires
            ``bf16_master_weights_and_grads``). Default False.
    """

    enabled: Bool = False
    immediate_grad_update: Bool = False
    check_grad_overflow: Bool = False
    bf16_master_weights_and_grads: Bool = False
    bf16_optimizer_states: Bool = False


class AmpConfig(FreeFormSection):
    """``amp``: NVIDIA Apex AMP. Keys other than ``enabled`` (for example
    ``opt_level``) are passed to ``apex.amp.initialize`` and are available as
    ``extra_params``."""

    enabled: Bool = False


class TorchAutocastConfig(ConfigSection):
    """``torch_autocast``: run the forward pass under ``torch.autocast``.

    Attributes:
        enabled: Default False.
        dtype: ``"bf16"`` or ``"fp16"`` (DeepSpeed spellings such as
            ``"bfloat16"`` are accepted). Default None.
        lower_precision_safe_modules: fully qualified module class names whose
            parameters may be kept in the lower precision. Default None.
    """

    enabled: Bool = False
    dtype: Optional[DtypeName] = None
    lower_precision_safe_modules: Optional[List[str]] = None


class DataTypesConfig(ConfigSection):
    """``data_types``.

    Attributes:
        grad_accum_dtype: dtype of the gradient accumulation buffer: None (follow
            the training precision), ``"fp32"``, ``"fp16"`` or ``"bf16"``. Default None.
    """

    grad_accum_dtype: Optional[DtypeName] = None
