"""Sections about saving state and I/O: ``checkpoint``, ``nebula``, ``aio``
and ``activation_checkpointing``."""
from typing import Optional

from pydantic import Field

from deepscale.config.base import ConfigSection
from deepscale.config.fields import Bool, Int, Str, choice


class ParallelWriteConfig(ConfigSection):
    """``checkpoint.parallel_write``."""

    pipeline_stage: Bool = False


class CheckpointWriterConfig(ConfigSection):
    """``checkpoint.writer``: DeepSpeed's fast checkpoint writer."""

    type: choice("MOCK", "PYTHON", "FAST", upper=True) = "FAST"
    io_buffer_size: Int = Field(64 * 1024 ** 2, ge=1)
    io_buffer_double: Bool = True
    io_multiplier: Int = Field(1, ge=1)
    show_statistics: Bool = False
    data_parallel: Optional[choice("REPLICA", "SOCKET", "MACHINE", upper=True)] = None
    decoupled: Bool = False


class CheckpointConfig(ConfigSection):
    """``checkpoint``.

    Attributes:
        tag_validation: what to do when ranks save under different tags:
            ``"Warn"``, ``"Ignore"`` or ``"Fail"`` (any case). Default ``"Warn"``
            (stored upper case).
        load_universal: load a universal (topology-independent) checkpoint. Default False.
        use_node_local_storage: each node writes to its own local disk. Default False.
        parallel_write: see ``ParallelWriteConfig``.
        checkpoint_serialization: use torch's zip serialization. Default True.
        writer: fast writer settings, or None for plain ``torch.save``. Default None.
    """

    tag_validation: choice("WARN", "IGNORE", "FAIL", upper=True) = "WARN"
    load_universal: Bool = False
    use_node_local_storage: Bool = False
    parallel_write: ParallelWriteConfig = Field(default_factory=ParallelWriteConfig)
    checkpoint_serialization: Bool = True
    writer: Optional[CheckpointWriterConfig] = None


class NebulaConfig(ConfigSection):
    """``nebula``: Azure Nebula asynchronous checkpointing."""

    enabled: Bool = False
    persistent_storage_path: Optional[Str] = None
    persistent_time_interval: Int = Field(100, ge=1)
    num_of_version_in_retention: Int = Field(2, ge=1)
    enable_nebula_load: Bool = True
    nebula_load_path: Optional[Str] = None


class AioConfig(ConfigSection):
    """``aio``: asynchronous NVMe I/O used by ZeRO-Infinity swapping.

    ``thread_count`` is DeepSpeed's older name for ``intra_op_parallelism``.
    """

    block_size: Int = Field(1_048_576, ge=1)
    queue_depth: Int = Field(8, ge=1)
    intra_op_parallelism: Int = Field(1, ge=1)
    thread_count: Optional[Int] = Field(None, ge=1)
    single_submit: Bool = False
    overlap_events: Bool = True
    use_gds: Bool = False


class ActivationCheckpointingConfig(ConfigSection):
    """``activation_checkpointing``: settings of the activation checkpointing
    module (``deepscale.checkpointing``)."""

    partition_activations: Bool = False
    contiguous_memory_optimization: Bool = False
    cpu_checkpointing: Bool = False
    number_checkpoints: Optional[Int] = Field(None, gt=0)
    synchronize_checkpoint_boundary: Bool = False
    profile: Bool = False
