"""What ``initialize`` does for tensor and sequence parallelism before it builds the engine.

From the config (``tensor_parallel.autotp_size``, ``tensor_parallel.tp.tp_size``,
``sequence_parallel_size``) it builds the parallel grid (the process groups of every axis) when
the user passed no ``mpu``, and applies AutoTP to the model when ``autotp_size`` asks for it.
"""
from typing import Any, Dict, Optional

import torch

from deepscale import comm as dist
from deepscale.parallel.autotp import apply_autotp
from deepscale.parallel.grid import build_parallel_grid, get_parallel_grid
from deepscale.runtime.engine_setup import broadcast_module_from_rank0
from deepscale.runtime.training_optimizer import TensorParallelNorm
from deepscale.utils.logging import log_dist


def _int(value, key: str) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return max(int(value), 1)


def degrees_from_raw(raw: Dict[str, Any]) -> Dict[str, int]:
    """``{"tp": N, "sp": M, "autotp": bool}`` from a raw (DeepSpeed-format) config dict."""
    section = raw.get("tensor_parallel") or {}
    autotp = _int(section.get("autotp_size"), "tensor_parallel.autotp_size")
    inner = section.get("tp", section.get("tensor_parallel")) or {}
    manual = _int(inner.get("tp_size"), "tensor_parallel.tp.tp_size")
    if autotp > 1 and manual > 1 and autotp != manual:
        raise ValueError(f"tensor_parallel.autotp_size={autotp} and tensor_parallel.tp.tp_size={manual} disagree; "
                         "set one of them (autotp_size shards the model automatically)")
    sp = _int(raw.get("sequence_parallel_size"), "sequence_parallel_size")
    return {"tp": max(autotp, manual), "sp": sp, "autotp": autotp > 1}


def grid_for_config(raw: Dict[str, Any]):
    """The parallel grid the config asks for, or None when every model-parallel degree is 1.

    A grid already registered with the same degrees (``deepscale.parallel.build_parallel_grid``
    or ``deepscale.tp_model_init``, which the model's layers were built with) is reused.
    """
    degrees = degrees_from_raw(raw)
    if degrees["tp"] == 1 and degrees["sp"] == 1:
        return None
    world = dist.get_world_size()
    if world % (degrees["tp"] * degrees["sp"]):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel size {degrees['tp']} x "
                         f"sequence_parallel_size {degrees['sp']}")
    current = get_parallel_grid()
    if (current is not None and current.size("tp") == degrees["tp"] and current.size("sp") == degrees["sp"]
            and current.topology.world_size == world):
        return current
    return build_parallel_grid(tp=degrees["tp"], sp=degrees["sp"])


def apply_config_autotp(model: torch.nn.Module, raw: Dict[str, Any], mpu) -> None:
    """Shard ``model`` with AutoTP when ``tensor_parallel.autotp_size`` > 1 (no-op if already sharded)."""
    if not degrees_from_raw(raw)["autotp"] or getattr(model, "_deepscale_autotp", None) is not None:
        return
    group = mpu.get_model_parallel_group()
    size = mpu.get_model_parallel_world_size()
    # Shards must come from identical dense weights on every tensor-parallel rank.
    broadcast_module_from_rank0(model, group, size)
    report = apply_autotp(model, group)
    log_dist(f"AutoTP tp={size}: {len(report.column)} column-parallel, {len(report.row)} row-parallel, "
             f"{len(report.vocab)} vocabulary-parallel, {len(report.replicated_heads)} shared key/value layers",
             ranks=[0])


def tp_model_init(model: torch.nn.Module, tp_size: int, dtype: Optional[torch.dtype] = None, config=None,
                  **kwargs) -> torch.nn.Module:
    """Shard ``model`` over ``tp_size`` tensor-parallel ranks before ``deepscale.initialize`` (DeepSpeed's call).

    Builds (or reuses) the parallel grid with ``tp=tp_size`` over all ranks, converts the model
    to ``dtype`` when given, and applies AutoTP. Pass the same ``tensor_parallel.autotp_size`` in
    the config given to ``initialize``.

    Args:
        model: the dense model, identical on every rank.
        tp_size: tensor-parallel degree (>= 1).
        dtype: convert the model to this dtype first. Default None (keep).
        config: accepted for DeepSpeed compatibility; unused.
    """
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_model_init: tp_size must be a positive integer, got {tp_size!r}")
    dist.init_distributed(verbose=False)
    if dtype is not None:
        model = model.to(dtype)
    mpu = grid_for_config({"tensor_parallel": {"autotp_size": tp_size}})
    if mpu is not None:
        apply_config_autotp(model, {"tensor_parallel": {"autotp_size": tp_size}}, mpu)
    return model


def tensor_parallel_norm(module: torch.nn.Module, mpu) -> Optional[TensorParallelNorm]:
    """What the optimizers' global gradient norm needs under tensor parallelism (None without it)."""
    size = mpu.get_model_parallel_world_size() if hasattr(mpu, "get_model_parallel_world_size") else 1
    if size <= 1:
        return None
    replicated = [p for p in module.parameters() if p.requires_grad and not getattr(p, "tensor_model_parallel", False)]
    return TensorParallelNorm(mpu.get_model_parallel_group(), size, replicated)
