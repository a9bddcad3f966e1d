"""The offload settings one ZeRO training optimizer needs, read once from the config.

``zero_optimization.offload_optimizer`` (DeepSpeed keys) plus ``sub_group_size`` and the ``aio``
section, validated into one frozen value so the ZeRO optimizers and the planner share a single
reading of the config.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from deepscale.ops.aio.config import AioConfig

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# Verify swap files on every read (also zero_optimization.debug_sequence_check at stage 3).
DEBUG_ENV = "DEEPSCALE_OFFLOAD_DEBUG"


@dataclass(frozen=True)
class OptimizerOffloadSettings:
    """Where the fp32 masters, gradient partition and optimizer states of a ZeRO optimizer live.

    Args:
        device: ``"none"``, ``"cpu"`` or ``"nvme"`` (``offload_optimizer.device``).
        nvme_path: directory for swap files (required for ``"nvme"``).
        pin_memory: page-lock the host buffers (falls back to pageable with one warning).
        buffer_count: NVMe: sub-group buffers in flight (read-ahead, update, write-behind). Default 4.
        ratio: fraction of the optimizer step run on the host (DeepSpeed's Twin-Flow); the rest
            stays on the device. Default 1.0.
        sub_group_size: NVMe: elements swapped in and updated at once. Default 1e9.
        pipeline_read, pipeline_write: NVMe: read the next sub-group / write the previous one
            while the current one is updated. Default False (DeepSpeed's default).
        fast_init: accepted (DeepSpeed key); states are always created at the first step here.
        aio: the ``aio`` section (block size, queue depth, threads).
        delayed_update: one-step delayed parameter update (DPU, changes numerics). Default False.
        delayed_update_warmup: synchronous steps before DPU starts. Default 0.
        debug: verify every swap file's logical size on read. Default False.
    """

    device: str = "none"
    nvme_path: Optional[str] = None
    pin_memory: bool = False
    buffer_count: int = 4
    ratio: float = 1.0
    sub_group_size: int = 1_000_000_000
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False
    aio: AioConfig = field(default_factory=AioConfig)
    delayed_update: bool = False
    delayed_update_warmup: int = 0
    debug: bool = False

    def __post_init__(self):
        if self.device not in OFFLOAD_DEVICES:
            raise ValueError(f"zero_optimization.offload_optimizer.device must be one of {OFFLOAD_DEVICES}, "
                             f"got {self.device!r}")
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("zero_optimization.offload_optimizer.device='nvme' needs "
                             "zero_optimization.offload_optimizer.nvme_path (a directory on a fast local disk)")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"zero_optimization.offload_optimizer.ratio must be in [0, 1], got {self.ratio}")
        if self.buffer_count < 1:
            raise ValueError(f"zero_optimization.offload_optimizer.buffer_count must be >= 1, got {self.buffer_count}")
        if self.sub_group_size < 1:
            raise ValueError(f"zero_optimization.sub_group_size must be >= 1, got {self.sub_group_size}")
        if self.delayed_update_warmup < 0:
            raise ValueError("zero_optimization.offload_optimizer.delayed_param_update_warmup_steps must be >= 0, "
                             f"got {self.delayed_update_warmup}")

    @property
    def enabled(self) -> bool:
        return self.device != "none"

    @property
    def nvme(self) -> bool:
        return self.device == "nvme"


def _aio_from_config(config) -> AioConfig:
    section = getattr(config, "aio", None)
    if section is None:
        return AioConfig()
    threads = section.thread_count if section.thread_count is not None else section.intra_op_parallelism
    return AioConfig(block_size=int(section.block_size), queue_depth=int(section.queue_depth),
                     thread_count=int(threads), single_submit=bool(section.single_submit),
                     overlap_events=bool(section.overlap_events), use_gds=bool(section.use_gds))


def offload_settings_from_config(config) -> OptimizerOffloadSettings:
    """The :class:`OptimizerOffloadSettings` of a parsed ``DeepScaleConfig``."""
    zero = config.zero_optimization
    section = getattr(zero, "offload_optimizer", None)
    if section is None or str(section.device) == "none":
        return OptimizerOffloadSettings()
    return OptimizerOffloadSettings(
        device=str(section.device), nvme_path=section.nvme_path, pin_memory=bool(section.pin_memory),
        buffer_count=int(section.buffer_count), ratio=float(section.ratio), sub_group_size=int(zero.sub_group_size),
        pipeline_read=bool(section.pipeline_read), pipeline_write=bool(section.pipeline_write),
        fast_init=bool(section.fast_init), aio=_aio_from_config(config),
        delayed_update=bool(getattr(section, "delayed_param_update", False)),
        delayed_update_warmup=int(getattr(section, "delayed_param_update_warmup_steps", 0)),
        debug=(zero.stage == 3 and bool(getattr(zero, "debug_sequence_check", False))) or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"))
