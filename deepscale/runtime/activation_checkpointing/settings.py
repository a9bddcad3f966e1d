"""Process-wide activation checkpointing settings: ``configure``, ``is_configured``, ``reset``.

DeepSpeed's ``deepspeed.checkpointing`` is configured once per process and then used by
``checkpoint(function, *args)`` calls deep inside model code, which cannot be handed an object,
so the settings live here in one module-level :class:`CheckpointSettings`.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from deepscale.config.checkpointing import ActivationCheckpointingConfig
from deepscale.config.loader import load_json_file
from deepscale.utils.logging import logger


@dataclass
class CheckpointSettings:
    """What ``configure`` set.

    Attributes:
        mpu: the model-parallel unit (``get_model_parallel_group()`` etc.) or None.
        partition_activations: split saved inputs across the model-parallel group. Default False.
        contiguous_checkpointing: copy saved inputs into preallocated slots. Default False.
        num_checkpoints: number of slots (checkpoints per forward) for contiguous mode. Default None.
        checkpoint_in_cpu: keep saved inputs in host memory. Default False.
        synchronize: synchronize the device at checkpoint boundaries. Default False.
        profile: time forward and recomputation of checkpoints. Default False.
    """

    mpu: Any = None
    partition_activations: bool = False
    contiguous_checkpointing: bool = False
    num_checkpoints: Optional[int] = None
    checkpoint_in_cpu: bool = False
    synchronize: bool = False
    profile: bool = False


@dataclass
class _State:
    settings: CheckpointSettings = field(default_factory=CheckpointSettings)
    configured: bool = False
    noted: set = field(default_factory=set)
    slots: Any = None  # ContiguousSlots, created lazily by saved_inputs
    recompute_depth: int = 0  # > 0 while a recomputation runs
    profile: Dict[str, float] = field(default_factory=lambda: {"calls": 0, "forward_s": 0.0,
                                                               "recompute_s": 0.0, "recomputes": 0})


_STATE = _State()


def settings() -> CheckpointSettings:
    """The current settings (defaults until :func:`configure` runs)."""
    return _STATE.settings


def state() -> _State:
    """Internal mutable state shared by the checkpoint implementations."""
    return _STATE


def note_once(key: str, message: str) -> None:
    """Log ``message`` once per process."""
    if key not in _STATE.noted:
        _STATE.noted.add(key)
        logger.info(message)


def _section_from(deepspeed_config) -> ActivationCheckpointingConfig:
    """The ``activation_checkpointing`` section of a config object, dict or JSON file path."""
    if isinstance(deepspeed_config, ActivationCheckpointingConfig):
        return deepspeed_config
    section = getattr(deepspeed_config, "activation_checkpointing", None)
    if isinstance(section, ActivationCheckpointingConfig):
        return section
    if isinstance(deepspeed_config, (str, os.PathLike)):
        deepspeed_config = load_json_file(deepspeed_config)
    if isinstance(deepspeed_config, dict):
        return ActivationCheckpointingConfig(**(deepspeed_config.get("activation_checkpointing") or {}))
    raise TypeError(f"configure(deepspeed_config=...) must be a config object, a dict or a JSON file path, "
                    f"got {type(deepspeed_config).__name__}")


def configure(mpu_, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None) -> None:
    """Configure activation checkpointing for this process.

    Values come from the ``activation_checkpointing`` section of ``deepspeed_config``; an
    argument that is not None overrides its key.

    Args:
        mpu_: model-parallel unit (``get_model_parallel_group``, ``get_model_parallel_world_size``,
            ``get_model_parallel_rank``) or None when there is no model parallelism.
        deepspeed_config: a ``DeepScaleConfig``, a config dict or a JSON path. Default None.
        partition_activations: ``partition_activations``. Default None (from the config).
        contiguous_checkpointing: ``contiguous_memory_optimization``. Default None.
        num_checkpoints: ``number_checkpoints``. Default None.
        checkpoint_in_cpu: ``cpu_checkpointing``. Default None.
        synchronize: ``synchronize_checkpoint_boundary``. Default None.
        profile: ``profile``. Default None.

    Raises:
        ValueError: contiguous checkpointing without a positive ``number_checkpoints``.
    """
    section = _section_from(deepspeed_config) if deepspeed_config is not None else ActivationCheckpointingConfig()

    def pick(arg, key):
        return getattr(section, key) if arg is None else arg

    new = CheckpointSettings(
        mpu=mpu_, partition_activations=bool(pick(partition_activations, "partition_activations")),
        contiguous_checkpointing=bool(pick(contiguous_checkpointing, "contiguous_memory_optimization")),
        num_checkpoints=pick(num_checkpoints, "number_checkpoints"),
        checkpoint_in_cpu=bool(pick(checkpoint_in_cpu, "cpu_checkpointing")),
        synchronize=bool(pick(synchronize, "synchronize_checkpoint_boundary")),
        profile=bool(pick(profile, "profile")))
    if new.contiguous_checkpointing and (not isinstance(new.num_checkpoints, int) or new.num_checkpoints < 1):
        raise ValueError("activation_checkpointing.contiguous_memory_optimization=true needs "
                         "activation_checkpointing.number_checkpoints set to the number of checkpoint calls "
                         f"per forward (a positive int), got {new.num_checkpoints!r}")
    reset()
    _STATE.settings = new
    _STATE.configured = True
    logger.debug(f"activation checkpointing configured: {new}")


def is_configured() -> bool:
    """True once :func:`configure` has run (and until :func:`unconfigure`)."""
    return _STATE.configured


def reset() -> None:
    """Drop the contiguous buffers and the profile counters (call between independent runs)."""
    _STATE.slots = None
    _STATE.profile.update(calls=0, forward_s=0.0, recompute_s=0.0, recomputes=0)


def unconfigure() -> None:
    """Back to the defaults, as if :func:`configure` had never run (used by tests)."""
    reset()
    _STATE.settings = CheckpointSettings()
    _STATE.configured = False
    _STATE.noted.clear()


def get_profile() -> Dict[str, float]:
    """With ``profile`` on: checkpoint calls, recomputations and the seconds spent in each."""
    return dict(_STATE.profile)


class boundary:
    """Context for one checkpointed forward or recomputation: device sync and profile timing."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        current = _STATE.settings
        if current.synchronize:
            from deepscale.accelerator import get_accelerator
            get_accelerator().synchronize()
        self.start = time.perf_counter() if current.profile else None
        return self

    def __exit__(self, *exc):
        current = _STATE.settings
        if current.synchronize:
            from deepscale.accelerator import get_accelerator
            get_accelerator().synchronize()
        if self.start is not None:
            prof = _STATE.profile
            prof[f"{self.what}_s"] += time.perf_counter() - self.start
            prof["calls" if self.what == "forward" else "recomputes"] += 1
        return False
