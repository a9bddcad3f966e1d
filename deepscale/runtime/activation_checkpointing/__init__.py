"""Activation checkpointing (``deepscale.checkpointing``): recompute activations in backward
instead of keeping them, with RNG replay, host or partitioned input storage and selective
recomputation. See docs/activation_checkpointing.md."""
from deepscale.parallel.random import RNGStatesTracker, get_cuda_rng_tracker
from deepscale.parallel.random import model_parallel_cuda_manual_seed as _seed_with_mpu
from deepscale.runtime.activation_checkpointing.non_reentrant import non_reentrant_checkpoint
from deepscale.runtime.activation_checkpointing.reentrant import CheckpointFunction, checkpoint
from deepscale.runtime.activation_checkpointing.selective import MATMUL_OPS, selective_checkpoint_context
from deepscale.runtime.activation_checkpointing.settings import (configure, get_profile, is_configured, reset,
                                                                 settings, unconfigure)


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default and the model-parallel RNG streams; the rank comes from the configured mpu.

    Args:
        seed: base seed; the model-parallel stream uses ``seed + 2718 + model-parallel rank``.
    """
    _seed_with_mpu(seed, settings().mpu)


__all__ = ["configure", "is_configured", "reset", "checkpoint", "non_reentrant_checkpoint", "CheckpointFunction",
           "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed", "RNGStatesTracker", "get_profile",
           "selective_checkpoint_context", "MATMUL_OPS", "settings", "unconfigure"]
