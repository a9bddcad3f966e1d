"""Job-shaping sections: ``elasticity`` and ``autotuning``."""
from typing import Any, Dict, List, Optional

from pydantic import Field

from deepscale.config.base import ConfigSection
from deepscale.config.fields import Bool, Float, Int, Str, choice


class ElasticityConfig(ConfigSection):
    """``elasticity``: choose a batch size that stays valid over a range of GPU counts."""

    enabled: Bool = False
    max_train_batch_size: Int = Field(2000, ge=1)
    micro_batch_sizes: List[Int] = Field(default_factory=lambda: [2, 4, 6])
    min_gpus: Int = Field(1, ge=1)
    max_gpus: Int = Field(10000, ge=1)
    min_time: Int = Field(0, ge=0)
    prefer_larger_batch: Bool = True
    ignore_non_elastic_batch_info: Bool = False
    version: Float = 0.1
    model_parallel_size: Int = Field(1, ge=1)
    num_gpus_per_node: Int = Field(1, ge=1)


class ModelInfoConfig(ConfigSection):
    """``autotuning.model_info``."""

    profile: Bool = False
    num_params: Optional[Int] = None
    hidden_size: Optional[Int] = None
    num_layers: Optional[Int] = None


class AutotuningConfig(ConfigSection):
    """``autotuning``: search ZeRO stage and micro-batch size for throughput."""

    enabled: Bool = False
    fast: Bool = True
    results_dir: Str = "autotuning_results"
    exps_dir: Str = "autotuning_exps"
    overwrite: Bool = True
    start_profile_step: Int = Field(3, ge=0)
    end_profile_step: Int = Field(5, ge=0)
    metric_path: Optional[Str] = None
    tuner_type: choice("gridsearch", "random", "model_based") = "gridsearch"
    tuner_early_stopping: Int = Field(5, ge=1)
    tuner_num_trials: Int = Field(50, ge=1)
    arg_mappings: Optional[Dict[str, Any]] = None
    max_train_batch_size: Optional[Int] = None
    min_train_batch_size: Int = Field(1, ge=1)
    max_train_micro_batch_size_per_gpu: Int = Field(1024, ge=1)
    min_train_micro_batch_size_per_gpu: Int = Field(1, ge=1)
    num_tuning_micro_batch_sizes: Int = Field(3, ge=1)
    mp_size: Int = Field(1, ge=1)
    metric: choice("latency", "throughput", "flops") = "throughput"
    model_info_path: Optional[Str] = None
    model_info: Optional[ModelInfoConfig] = None
