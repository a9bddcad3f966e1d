"""Model-parallel sections: ``pipeline``, ``tensor_parallel`` and ``hybrid_engine``."""
from pydantic import Field

from deepscale.config.base import ConfigSection
from deepscale.config.fields import AutoOrInt, Bool, DtypeName, Int, Str, choice

# Names of deepscale.runtime.pipe.schedules.SCHEDULES (config imports nothing from the runtime).
PipeSchedule = choice("1f1b", "gpipe", "interleaved_1f1b", "zb_h1", "zb_v")


class PipelineConfig(ConfigSection):
    """``pipeline``: settings read by the pipeline engine.

    Attributes:
        stages: number of pipeline stages, or ``"auto"`` to take it from the
            ``PipelineModule``. Default ``"auto"``.
        partition: layer partitioning method (``"parameters"``, ``"uniform"``,
            ``"type:<regex>"``, ...). Default ``"best"``.
        seed_layers: seed each layer's initialisation separately. Default False.
        activation_checkpoint_interval: checkpoint every N layers, 0 disables. Default 0.
        pipe_partitioned: partition activations sent between stages over the
            tensor-parallel group. Default True.
        grad_partitioned: likewise for gradients. Default True.
        use_reentrant: use the reentrant checkpoint implementation. Default True.
        schedule: the pipeline schedule: ``"1f1b"`` (default, DeepSpeed's), ``"gpipe"``,
            ``"interleaved_1f1b"``, ``"zb_h1"`` or ``"zb_v"`` (see docs/pipeline.md).
    """

    stages: AutoOrInt = "auto"
    partition: Str = "best"
    seed_layers: Bool = False
    activation_checkpoint_interval: Int = Field(0, ge=0)
    pipe_partitioned: Bool = True
    grad_partitioned: Bool = True
    use_reentrant: Bool = True
    schedule: PipeSchedule = "1f1b"


class TPConfig(ConfigSection):
    """``tensor_parallel.tp`` (also accepted as ``tensor_parallel.tensor_parallel``)."""

    tp_size: Int = Field(1, ge=1)
    tp_grain_size: Int = Field(1, ge=1)


class TensorParallelConfig(ConfigSection):
    """``tensor_parallel``: automatic tensor parallelism (AutoTP) for training.

    Attributes:
        autotp_size: tensor-parallel degree; 0 disables AutoTP. Default 0.
        dtype: dtype the model is converted to. Default ``"fp16"``.
        tensor_parallel: the ``tp`` sub-section (``tp_size``, ``tp_grain_size``).
        keep_module_on_host: keep loaded checkpoint weights on the host. Default False.
        replace_with_kernel_inject: (alias ``kernel_inject``) inject fused kernels. Default False.
    """

    autotp_size: Int = Field(0, ge=0)
    dtype: DtypeName = "fp16"
    tensor_parallel: TPConfig = Field(default_factory=TPConfig, alias="tp")
    keep_module_on_host: Bool = False
    replace_with_kernel_inject: Bool = Field(False, alias="kernel_inject")


class HybridEngineConfig(ConfigSection):
    """``hybrid_engine``: switch one model between training and fast generation (RLHF)."""

    enabled: Bool = False
    max_out_tokens: Int = Field(512, ge=1)
    inference_tp_size: Int = Field(1, ge=1)
    release_inference_cache: Bool = False
    pin_parameters: Bool = True
    tp_gather_partition_size: Int = Field(8, ge=1)
