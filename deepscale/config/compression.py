"""Compression sections: ``compression_training``, ``quantize_training`` (MoQ)
and ``weight_quantization``."""
from typing import Any, Dict, List, Optional

from pydantic import Field

from deepscale.config.algorithms import EigenvalueConfig
from deepscale.config.base import ConfigSection
from deepscale.config.fields import Bool, Float, Int, Str, choice

COMPRESSION_TECHNIQUES = ("weight_quantization", "activation_quantization", "sparse_pruning",
                          "row_pruning", "head_pruning", "channel_pruning")


class CompressionTechniqueConfig(ConfigSection):
    """One technique of ``compression_training``. ``shared_parameters`` holds
    ``enabled``, schedule offsets and method options; ``different_groups``
    maps user-chosen group names to module scopes. Both are passed through."""

    shared_parameters: Dict[str, Any] = Field(default_factory=dict)
    different_groups: Dict[str, Any] = Field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether ``shared_parameters.enabled`` is true."""
        return bool(self.shared_parameters.get("enabled", False))


class LayerReductionConfig(ConfigSection):
    """``compression_training.layer_reduction``: distil into fewer layers."""

    enabled: Bool = False
    keep_number_layer: Optional[Int] = Field(None, ge=1)
    module_name_prefix: Optional[Str] = None
    teacher_layer: Optional[List[Int]] = None
    other_module_name: Optional[List[str]] = None


def _technique():
    return Field(default_factory=CompressionTechniqueConfig)


class CompressionTrainingConfig(ConfigSection):
    """``compression_training``: DeepSpeed Compression (quantization, pruning, layer reduction)."""

    weight_quantization: CompressionTechniqueConfig = _technique()
    activation_quantization: CompressionTechniqueConfig = _technique()
    sparse_pruning: CompressionTechniqueConfig = _technique()
    row_pruning: CompressionTechniqueConfig = _technique()
    head_pruning: CompressionTechniqueConfig = _technique()
    channel_pruning: CompressionTechniqueConfig = _technique()
    layer_reduction: LayerReductionConfig = Field(default_factory=LayerReductionConfig)


class QuantizeBitsConfig(ConfigSection):
    """``quantize_training.quantize_bits``."""

    start_bits: Int = Field(16, ge=1)
    target_bits: Int = Field(8, ge=1)


class QuantizeScheduleConfig(ConfigSection):
    """``quantize_training.quantize_schedule``."""

    quantize_period: Int = Field(1000, ge=1)
    schedule_offset: Int = Field(1000, ge=0)


class FP16MixedQuantizeConfig(ConfigSection):
    """``quantize_training.fp16_mixed_quantize``."""

    enabled: Bool = False
    quantize_change_ratio: Float = Field(0.001, ge=0)


class QuantizeAlgoConfig(ConfigSection):
    """``quantize_training.quantize_algo``."""

    q_type: choice("symmetric", "asymmetric") = "symmetric"
    rounding: choice("nearest", "stochastic") = "nearest"


class QuantizeTrainingConfig(ConfigSection):
    """``quantize_training``: MoQ, quantization-aware training with a bit schedule."""

    enabled: Bool = False
    quantize_verbose: Bool = False
    quantizer_kernel: Bool = False
    quantize_groups: Int = Field(1, ge=1)
    quantize_bits: QuantizeBitsConfig = Field(default_factory=QuantizeBitsConfig)
    quantize_schedule: QuantizeScheduleConfig = Field(default_factory=QuantizeScheduleConfig)
    fp16_mixed_quantize: FP16MixedQuantizeConfig = Field(default_factory=FP16MixedQuantizeConfig)
    quantize_algo: QuantizeAlgoConfig = Field(default_factory=QuantizeAlgoConfig)
    eigenvalue: EigenvalueConfig = Field(default_factory=EigenvalueConfig)


class WeightQuantizationConfig(ConfigSection):
    """Top-level ``weight_quantization``: quantized weights for ZeRO-Inference.
    As in DeepSpeed, ``enabled`` defaults to True, so giving the section turns it on."""

    enabled: Bool = True
    num_bits: Int = Field(8, ge=1)
    q_type: choice("symmetric", "asymmetric") = "symmetric"
    q_groups: Int = Field(1, ge=1)
    quantized_initialization: Dict[str, Any] = Field(default_factory=dict)
    post_init_quant: Dict[str, Any] = Field(default_factory=dict)
