"""``DeepScaleConfig``: the whole DeepSpeed-format config as one validated object."""
import copy
from typing import Any, Dict, List, Optional

from pydantic import Field, PrivateAttr, ValidationError

from deepscale.config.algorithms import (CurriculumLearningLegacyConfig, DataEfficiencyConfig, EigenvalueConfig,
                                         ProgressiveLayerDropConfig, SparseAttentionConfig)
from deepscale.config.base import ConfigSection
from deepscale.config.batch import check_dp_world_size, resolve_batch_sizes
from deepscale.config.checkpointing import (ActivationCheckpointingConfig, AioConfig, CheckpointConfig,
                                            NebulaConfig)
from deepscale.config.compiler import CompileConfig
from deepscale.config.compression import (CompressionTrainingConfig, QuantizeTrainingConfig,
                                          WeightQuantizationConfig)
from deepscale.config.describe import describe_config, summary_line
from deepscale.config.elastic import AutotuningConfig, ElasticityConfig
from deepscale.config.errors import describe_validation_error, find_unknown_keys
from deepscale.config.fields import Bool, DtypeName, Float, Int, IntOrNever
from deepscale.config.loader import describe_source, load_config_dict
from deepscale.config.monitors import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
from deepscale.config.optim import OptimizerConfig, SchedulerConfig
from deepscale.config.params import auto_placeholder_message, find_auto_placeholders
from deepscale.config.parallelism import HybridEngineConfig, PipelineConfig, TensorParallelConfig
from deepscale.config.precision import AmpConfig, BF16Config, DataTypesConfig, FP16Config, TorchAutocastConfig
from deepscale.config.profiling import CollectiveWatchdogConfig, CommsLoggerConfig, FlopsProfilerConfig, TimersConfig
from deepscale.config.zero import ZeroConfig, normalize_legacy_zero


def _section(cls, **kwargs):
    return Field(default_factory=cls, **kwargs)


class DeepScaleConfig(ConfigSection):
    """A DeepSpeed-format training config, parsed once and validated.

    Build it with ``from_dict`` or ``from_source``, never with the
    constructor: those also reject unknown keys with a suggestion, resolve the
    batch triad against the data-parallel size, cross-check sections and
    refuse features that are not built yet. After that the three batch fields
    are plain ints.

    Each DeepSpeed section is an attribute holding its own typed model (for
    example ``cfg.fp16.loss_scale_window``, ``cfg.zero_optimization.stage``).
    The original dict is kept as ``raw``.
    """

    train_batch_size: Optional[Int] = None
    train_micro_batch_size_per_gpu: Optional[Int] = None
    gradient_accumulation_steps: Optional[Int] = None
    steps_per_print: IntOrNever = Field(10, ge=1)  # inf (None): never print
    wall_clock_breakdown: Bool = False
    memory_breakdown: Bool = False
    dump_state: Bool = False
    # DeepSpeed 0.19.8 clips at a global norm of 1.0 unless told otherwise (0 disables).
    gradient_clipping: Float = Field(1.0, ge=0.0)
    prescale_gradients: Bool = False
    gradient_predivide_factor: Float = Field(1.0, gt=0.0)
    sparse_gradients: Bool = False
    communication_data_type: Optional[DtypeName] = None
    seq_parallel_communication_data_type: DtypeName = "fp32"
    dataloader_drop_last: Bool = False
    zero_allow_untested_optimizer: Bool = False
    zero_force_ds_cpu_optimizer: Bool = True
    disable_allgather: Bool = False
    fp32_allreduce: Bool = False
    vocabulary_size: Optional[Int] = Field(None, ge=1)
    graph_harvesting: Bool = False
    use_data_before_expert_parallelism: Bool = False
    sequence_parallel_size: Int = Field(1, ge=1)

    fp16: FP16Config = _section(FP16Config)
    bf16: BF16Config = _section(BF16Config, alias="bfloat16")
    amp: AmpConfig = _section(AmpConfig)
    torch_autocast: TorchAutocastConfig = _section(TorchAutocastConfig)
    data_types: DataTypesConfig = _section(DataTypesConfig)
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    zero_optimization: ZeroConfig = _section(ZeroConfig)
    activation_checkpointing: ActivationCheckpointingConfig = _section(ActivationCheckpointingConfig)
    aio: AioConfig = _section(AioConfig)
    checkpoint: CheckpointConfig = _section(CheckpointConfig)
    nebula: NebulaConfig = _section(NebulaConfig)
    datastates_ckpt: Optional[Dict[str, Any]] = None
    flops_profiler: FlopsProfilerConfig = _section(FlopsProfilerConfig)
    comms_logger: CommsLoggerConfig = _section(CommsLoggerConfig)
    collective_watchdog: CollectiveWatchdogConfig = _section(CollectiveWatchdogConfig)
    timers: TimersConfig = _section(TimersConfig)
    tensorboard: TensorBoardConfig = _section(TensorBoardConfig)
    wandb: WandbConfig = _section(WandbConfig)
    csv_monitor: CSVConfig = _section(CSVConfig)
    comet: CometConfig = _section(CometConfig)
    pipeline: PipelineConfig = _section(PipelineConfig)
    tensor_parallel: TensorParallelConfig = _section(TensorParallelConfig)
    hybrid_engine: HybridEngineConfig = _section(HybridEngineConfig)
    elasticity: ElasticityConfig = _section(ElasticityConfig)
    autotuning: AutotuningConfig = _section(AutotuningConfig)
    compression_training: CompressionTrainingConfig = _section(CompressionTrainingConfig)
    quantize_training: QuantizeTrainingConfig = _section(QuantizeTrainingConfig)
    weight_quantization: Optional[WeightQuantizationConfig] = None
    data_efficiency: DataEfficiencyConfig = _section(DataEfficiencyConfig)
    curriculum_learning: CurriculumLearningLegacyConfig = _section(CurriculumLearningLegacyConfig)
    sparse_attention: Optional[SparseAttentionConfig] = None
    progressive_layer_drop: ProgressiveLayerDropConfig = _section(ProgressiveLayerDropConfig)
    eigenvalue: EigenvalueConfig = _section(EigenvalueConfig)
    compile: CompileConfig = _section(CompileConfig)

    _raw: Dict[str, Any] = PrivateAttr(default_factory=dict)
    _dp_world_size: int = PrivateAttr(default=1)
    _ignored_keys: List[str] = PrivateAttr(default_factory=list)
    _source: str = PrivateAttr(default="dict")

    @classmethod
    def from_dict(cls, d: Dict[str, Any], dp_world_size: int = 1) -> "DeepScaleConfig":
        """Validate a DeepSpeed-format config dict.

        Args:
            d: the config, as loaded from JSON. It is not modified.
            dp_world_size: number of data-parallel ranks, used to resolve the
                batch triad. Default 1.

        Raises:
            TypeError: ``d`` is not a dict or ``dp_world_size`` is not an int.
            ValueError: unknown keys, wrong types, inconsistent batch sizes or
                conflicting sections; the message names each offending key.
            FeatureNotAvailableError: the config enables a feature that is not
                built yet (a ValueError subclass).
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        dp_world_size = check_dp_world_size(dp_world_size)
        data = copy.deepcopy(d)
        if "zero_optimization" in data:
            data["zero_optimization"] = normalize_legacy_zero(data["zero_optimization"])
        problems = find_unknown_keys(cls, data)
        if problems:
            raise ValueError("\n".join(problems))
        placeholders = find_auto_placeholders(cls, data)
        if placeholders:
            raise ValueError(auto_placeholder_message(placeholders))
        try:
            cfg = cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(describe_validation_error(err, data, cls)) from None
        cfg._raw = copy.deepcopy(d)
        cfg._dp_world_size = dp_world_size
        cfg._check_precision()
        (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
         cfg.gradient_accumulation_steps) = resolve_batch_sizes(cfg.train_batch_size,
                                                                cfg.train_micro_batch_size_per_gpu,
                                                                cfg.gradient_accumulation_steps, dp_world_size)
        # Imported here because features.py reads DeepScaleConfig attributes.
        from deepscale.config.features import check_feature_availability
        cfg._ignored_keys = check_feature_availability(cfg)
        return cfg

    @classmethod
    def from_source(cls, config=None, config_params=None, args=None, dp_world_size: int = 1) -> "DeepScaleConfig":
        """Load the config from exactly one source and validate it.

        Args:
            config: a dict, or a path (str or os.PathLike) to a JSON file. Default None.
            config_params: a dict (DeepSpeed's older argument name). Default None.
            args: an argparse Namespace whose ``deepscale_config`` or
                ``deepspeed_config`` is a JSON file path. Default None.
            dp_world_size: number of data-parallel ranks. Default 1.
        """
        data = load_config_dict(config=config, config_params=config_params, args=args)
        cfg = cls.from_dict(data, dp_world_size=dp_world_size)
        cfg._source = describe_source(config=config, config_params=config_params, args=args)
        return cfg

    def _check_precision(self) -> None:
        if self.fp16.enabled and self.bf16.enabled:
            bf16_key = "bfloat16" if "bfloat16" in self._raw else "bf16"
            raise ValueError(f"fp16.enabled and {bf16_key}.enabled are both true; enable at most one "
                             "of fp16 and bf16")

    @property
    def raw(self) -> Dict[str, Any]:
        """The config dict as given (a copy; edits do not affect this object)."""
        return self._raw

    @property
    def source(self) -> str:
        """Where the config came from: a file path, or ``"dict"``."""
        return self._source

    @property
    def dp_world_size(self) -> int:
        """The data-parallel size the batch triad was resolved against."""
        return self._dp_world_size

    @property
    def ignored_keys(self) -> List[str]:
        """Keys that were accepted but have no effect yet (each was logged once)."""
        return list(self._ignored_keys)

    @property
    def fp16_enabled(self) -> bool:
        """Whether fp16 training is on."""
        return self.fp16.enabled

    @property
    def bf16_enabled(self) -> bool:
        """Whether bf16 training is on."""
        return self.bf16.enabled

    @property
    def zero_stage(self) -> int:
        """``zero_optimization.stage``."""
        return self.zero_optimization.stage

    @property
    def zero_enabled(self) -> bool:
        """Whether a ZeRO stage above 0 is selected."""
        return self.zero_optimization.stage > 0

    @property
    def loss_scale_is_dynamic(self) -> bool:
        """True when fp16 is on and ``fp16.loss_scale`` is 0 (dynamic scaling)."""
        return self.fp16.enabled and self.fp16.dynamic_loss_scale

    def describe(self) -> str:
        """A multi-line, human-readable summary for logs."""
        return describe_config(self)

    def __repr__(self) -> str:
        return summary_line(self)

    __str__ = __repr__
