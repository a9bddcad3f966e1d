"""Human-readable views of a ``DeepScaleConfig`` for logs."""
from typing import Any, Dict, Iterator, Tuple


def _precision(cfg) -> str:
    if cfg.fp16.enabled:
        scaling = ("dynamic loss scale" if cfg.fp16.dynamic_loss_scale
                   else f"static loss scale {cfg.fp16.loss_scale:g}")
        return f"fp16 ({scaling})"
    if cfg.bf16.enabled:
        return "bf16"
    return "fp32"


def summary_line(cfg) -> str:
    """One line: batch triad, precision, ZeRO stage, optimizer and scheduler."""
    optimizer = cfg.optimizer.type if cfg.optimizer is not None else None
    scheduler = cfg.scheduler.type if cfg.scheduler is not None else None
    return (f"DeepScaleConfig(train_batch_size={cfg.train_batch_size}, "
            f"train_micro_batch_size_per_gpu={cfg.train_micro_batch_size_per_gpu}, "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}, dp_world_size={cfg.dp_world_size}, "
            f"precision={_precision(cfg)}, zero_stage={cfg.zero_optimization.stage}, "
            f"optimizer={optimizer}, scheduler={scheduler})")


def _flatten(data: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not key.endswith("params"):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def describe_config(cfg) -> str:
    """A multi-line summary: the headline settings, then every non-default key."""
    lines = [
        f"DeepScale config (source: {cfg.source})",
        f"  batch: train_batch_size={cfg.train_batch_size} = micro batch {cfg.train_micro_batch_size_per_gpu}"
        f" x accumulation {cfg.gradient_accumulation_steps} x data-parallel {cfg.dp_world_size}",
        f"  precision: {_precision(cfg)}",
        f"  zero_optimization.stage: {cfg.zero_optimization.stage}",
        f"  optimizer: {cfg.optimizer.type if cfg.optimizer else None}"
        f"{' ' + str(cfg.optimizer.params) if cfg.optimizer and cfg.optimizer.params else ''}",
        f"  scheduler: {cfg.scheduler.type if cfg.scheduler else None}"
        f"{' ' + str(cfg.scheduler.params) if cfg.scheduler and cfg.scheduler.params else ''}",
    ]
    non_default = cfg.model_dump(exclude_defaults=True)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "optimizer", "scheduler"):
        non_default.pop(key, None)
    settings = list(_flatten(non_default))
    if settings:
        lines.append("  other non-default settings:")
        lines.extend(f"    {path} = {value!r}" for path, value in settings)
    if cfg.ignored_keys:
        lines.append("  accepted but without effect yet: " + ", ".join(cfg.ignored_keys))
    return "\n".join(lines)
