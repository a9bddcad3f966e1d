"""DeepSpeed-engine names that integrations (Hugging Face Trainer/Accelerate, Lightning) call.

Kept apart from engine.py so the Engine stays a composition; ``Engine`` inherits this mixin.
Every member is backed by engine state, nothing here trains.
"""
from typing import Any, Dict


class EngineCompatMixin:
    """DeepSpeed ``DeepSpeedEngine`` accessors on top of :class:`deepscale.runtime.engine.Engine`."""

    _step_applied = False  # set by Engine.step()

    @property
    def config(self) -> Dict[str, Any]:
        """The config as the plain dict it was given (DeepSpeed's ``engine.config``; the HF Trainer
        calls ``.get`` on it). Internal code reads the typed config, ``engine._config``."""
        raw = getattr(self._config, "raw", None)
        return raw if raw is not None else {}

    def was_step_applied(self) -> bool:
        """True if the latest ``step()`` updated the weights: False after a micro-step inside a
        gradient accumulation window and after a step skipped for an fp16 overflow."""
        return bool(self._step_applied)

    def zero_optimization(self) -> bool:
        """Whether a ZeRO stage above 0 is on."""
        return self._config.zero_stage > 0

    def zero_optimization_partition_gradients(self) -> bool:
        """Whether gradients are partitioned (ZeRO stage 2 or 3)."""
        return self._config.zero_stage >= 2

    def zero_optimization_partition_weights(self) -> bool:
        """Whether parameters are partitioned (ZeRO stage 3)."""
        return self._config.zero_stage == 3

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """``zero_optimization.stage3_gather_16bit_weights_on_model_save``: whether
        ``save_16bit_model`` (and Accelerate's ``get_state_dict``) may gather ZeRO-3 weights."""
        return bool(self._config.zero_optimization.gather_16bit_weights_on_model_save)

    def zero_offload_optimizer(self) -> bool:
        """Whether optimizer states are offloaded (``zero_optimization.offload_optimizer``)."""
        offload = getattr(self._config.zero_optimization, "offload_optimizer", None)
        return offload is not None and str(getattr(offload, "device", "none")).lower() not in ("none", "")

    def zero_offload_param(self) -> bool:
        """Whether parameters are offloaded (``zero_optimization.offload_param``)."""
        offload = getattr(self._config.zero_optimization, "offload_param", None)
        return offload is not None and str(getattr(offload, "device", "none")).lower() not in ("none", "")

    def get_data_parallel_rank(self) -> int:
        """This rank's index in the data-parallel group."""
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        """Number of data-parallel ranks."""
        return self.dp_world_size

    @property
    def data_parallel_group(self):
        """The data-parallel process group (None: the world)."""
        return self.dp_group
