"""Typed configuration for deepscale, in DeepSpeed's JSON format.

The config is parsed once into validated models:

    from deepscale.config import DeepScaleConfig
    cfg = DeepScaleConfig.from_source(config="ds_config.json", dp_world_size=8)
    cfg.train_micro_batch_size_per_gpu, cfg.fp16.loss_scale_window, cfg.zero_stage

This package imports nothing from the rest of deepscale except
``deepscale.utils.logging``.
"""
from deepscale.config.batch import resolve_batch_sizes
from deepscale.config.config import DeepScaleConfig
from deepscale.config.errors import FeatureNotAvailableError, InitializeArgumentError
from deepscale.config.features import AVAILABLE_ZERO_STAGES, check_feature_availability
from deepscale.config.loader import load_config_dict

__all__ = [
    "AVAILABLE_ZERO_STAGES",
    "DeepScaleConfig",
    "FeatureNotAvailableError",
    "InitializeArgumentError",
    "check_feature_availability",
    "load_config_dict",
    "resolve_batch_sizes",
]
