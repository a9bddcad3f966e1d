"""``zero_optimization`` and its ``offload_param`` / ``offload_optimizer`` /
``zenflow`` / ``leaf_module`` sub-sections.

Defaults follow DeepSpeed. The ZeRO-3 keys keep their DeepSpeed ``stage3_``
spelling as an alias: ``stage3_prefetch_bucket_size`` and
``prefetch_bucket_size`` name the same field.
"""
import sys
from typing import Any, Dict, List, Optional

from pydantic import Field, model_validator

from deepscale.config.base import ConfigSection
from deepscale.config.fields import AutoOrInt, Bool, Float, Int, Str, choice
from deepscale.utils.logging import logger

OffloadDevice = choice("none", "cpu", "nvme")


class OffloadParamConfig(ConfigSection):
    """``zero_optimization.offload_param``: move parameters to CPU or NVMe (ZeRO-3 only)."""

    device: OffloadDevice = "none"
    nvme_path: Optional[Str] = None
    buffer_count: Int = Field(5, ge=0)
    buffer_size: Int = Field(100_000_000, ge=0)
    max_in_cpu: Int = Field(1_000_000_000, ge=0)
    pin_memory: Bool = False


class OffloadOptimizerConfig(ConfigSection):
    """``zero_optimization.offload_optimizer``: keep optimizer states (and run
    the optimizer step) on CPU, or swap them to NVMe."""

    device: OffloadDevice = "none"
    nvme_path: Optional[Str] = None
    buffer_count: Int = Field(4, ge=0)
    buffer_size: Int = Field(100_000_000, ge=0)
    pin_memory: Bool = False
    pipeline_read: Bool = False
    pipeline_write: Bool = False
    fast_init: Bool = False
    ratio: Float = Field(1.0, ge=0.0, le=1.0)
    super_offload: Bool = False
    # deepscale addition (docs/offload.md): the ZeRO-Offload paper's one-step delayed parameter
    # update; changes numerics, off by default.
    delayed_param_update: Bool = False
    delayed_param_update_warmup_steps: Int = Field(0, ge=0)
    cpuadam_cores_perc: Float = Field(0.8, ge=0.0, le=1.0)


class ZenFlowConfig(ConfigSection):
    """``zero_optimization.zenflow``: ZenFlow stall-free offloading."""

    topk_ratio: Float = Field(0.1, ge=0.0, le=1.0)
    select_strategy: choice("auto", "step", "epoch") = "auto"
    select_interval: AutoOrInt = "auto"
    update_interval: AutoOrInt = "auto"
    overlap_step: Bool = False
    offload: Bool = False
    auto_ratio: Float = Field(0.99, ge=0.0, le=1.0)
    full_warm_up_rounds: Int = 0


class LeafModuleConfig(ConfigSection):
    """``zero_optimization.leaf_module``: modules ZeRO-3 treats as one unit."""

    classes: List[str] = Field(default_factory=list)
    names: List[str] = Field(default_factory=list)


def _alias(default: Any, alias: str, **constraints):
    return Field(default, alias=alias, **constraints)


class ZeroConfig(ConfigSection):
    """``zero_optimization``: ZeRO memory optimisations.

    ``stage`` selects 0 (off), 1 (optimizer states), 2 (+ gradients) or
    3 (+ parameters). ``overlap_comm`` defaults to True at stage 3 and False
    otherwise, as in DeepSpeed. The deprecated ``cpu_offload``,
    ``cpu_offload_param`` and ``stage3_gather_fp16_weights_on_model_save`` keys
    are mapped onto their replacements with a warning.
    """

    stage: Int = Field(0, ge=0, le=3)
    contiguous_gradients: Bool = True
    reduce_scatter: Bool = True
    reduce_bucket_size: Int = Field(500_000_000, ge=0)
    use_multi_rank_bucket_allreduce: Bool = True
    allgather_partitions: Bool = True
    allgather_bucket_size: Int = Field(500_000_000, ge=0)
    overlap_comm: Optional[Bool] = None
    load_from_fp32_weights: Bool = True
    elastic_checkpoint: Bool = False
    offload_param: Optional[OffloadParamConfig] = None
    offload_optimizer: Optional[OffloadOptimizerConfig] = None
    zenflow: Optional[ZenFlowConfig] = None
    sub_group_size: Int = Field(1_000_000_000, ge=0)
    cpu_offload_param: Optional[Bool] = None
    cpu_offload_use_pin_memory: Optional[Bool] = None
    cpu_offload: Optional[Bool] = None
    prefetch_bucket_size: Int = _alias(50_000_000, "stage3_prefetch_bucket_size", ge=0)
    param_persistence_threshold: Int = _alias(100_000, "stage3_param_persistence_threshold", ge=0)
    model_persistence_threshold: Int = _alias(sys.maxsize, "stage3_model_persistence_threshold", ge=0)
    max_live_parameters: Int = _alias(1_000_000_000, "stage3_max_live_parameters", ge=0)
    max_reuse_distance: Int = _alias(1_000_000_000, "stage3_max_reuse_distance", ge=0)
    gather_16bit_weights_on_model_save: Bool = _alias(False, "stage3_gather_16bit_weights_on_model_save")
    module_granularity_threshold: Int = _alias(0, "stage3_module_granularity_threshold")
    use_all_reduce_for_fetch_params: Bool = _alias(False, "stage3_use_all_reduce_for_fetch_params")
    allgather_sequential: Bool = _alias(False, "stage3_allgather_sequential")
    # deepscale additions (ZeRO-3 hang diagnosis, docs/zero3.md): also check the reduce-scatter
    # sequence (gathers are always checked); the older spelling of collective_watchdog.timeout.
    debug_sequence_check: Bool = _alias(False, "stage3_debug_sequence_check")
    watchdog_timeout: Float = _alias(300.0, "stage3_watchdog_timeout", ge=0.0)
    stage3_gather_fp16_weights_on_model_save: Optional[Bool] = None
    ignore_unused_parameters: Bool = True
    legacy_stage1: Bool = False
    round_robin_gradients: Bool = False
    zero_hpz_partition_size: Int = Field(1, ge=0)
    zero_quantized_weights: Bool = False
    zero_quantized_nontrainable_weights: Bool = False
    zero_quantized_gradients: Bool = False
    zeropp_loco_param: Optional[Dict[str, Any]] = None
    mics_shard_size: Int = -1
    mics_hierarchical_params_gather: Bool = False
    memory_efficient_linear: Bool = True
    pipeline_loading_checkpoint: Bool = False
    override_module_apply: Bool = True
    log_trace_cache_warnings: Bool = False
    enable_sanity_checks: Bool = False
    save_muon_momentum_buffer_in_memory: Bool = False
    leaf_module: LeafModuleConfig = Field(default_factory=LeafModuleConfig)

    @model_validator(mode="after")
    def _resolve_dynamic_defaults(self) -> "ZeroConfig":
        if self.overlap_comm is None:
            self.overlap_comm = self.stage == 3
        self._apply_deprecated_keys()
        return self

    def _apply_deprecated_keys(self) -> None:
        """Map DeepSpeed's deprecated spellings onto their replacements."""
        if self.cpu_offload is not None:
            logger.warning("zero_optimization.cpu_offload is deprecated; use "
                           "zero_optimization.offload_optimizer.device='cpu'")
            if self.cpu_offload and self.offload_optimizer is None:
                self.offload_optimizer = OffloadOptimizerConfig(device="cpu")
        if self.cpu_offload_param is not None:
            logger.warning("zero_optimization.cpu_offload_param is deprecated; use "
                           "zero_optimization.offload_param.device='cpu'")
            if self.cpu_offload_param and self.offload_param is None:
                self.offload_param = OffloadParamConfig(device="cpu")
        if self.cpu_offload_use_pin_memory is not None:
            logger.warning("zero_optimization.cpu_offload_use_pin_memory is deprecated; use "
                           "pin_memory in offload_param / offload_optimizer")
        if self.stage3_gather_fp16_weights_on_model_save is not None:
            logger.warning("zero_optimization.stage3_gather_fp16_weights_on_model_save is deprecated; "
                           "use stage3_gather_16bit_weights_on_model_save")
            if self.stage3_gather_fp16_weights_on_model_save:
                self.gather_16bit_weights_on_model_save = True


def normalize_legacy_zero(value: Any) -> Any:
    """DeepSpeed once accepted ``"zero_optimization": true``; map it to a section.

    ``true`` meant stage 1 and ``false`` stage 0. Any other value is returned
    unchanged for normal validation.
    """
    if isinstance(value, bool):
        logger.warning("'zero_optimization': %s is a deprecated form; use "
                       "'zero_optimization': {'stage': %d}", str(value).lower(), int(value))
        return {"stage": 1 if value else 0}
    return value
