"""Which config features this version of deepscale has built.

Every DeepSpeed section is parsed and validated, but some switch on features
that do not exist here yet. Two tables decide what happens:

* ``UNAVAILABLE_FEATURES``: settings that turn on a missing feature. Enabling
  one raises ``FeatureNotAvailableError`` naming the key and the feature, so a
  run never silently trains without something it asked for.
* ``TUNING_ONLY_KEYS``: keys that only tune a missing feature (or are
  DeepSpeed leftovers with no effect). They are accepted with one warning per
  key the user actually wrote.

When a feature lands, edit these tables (for ZeRO, ``AVAILABLE_ZERO_STAGES``)
in the same change.
"""
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from pydantic import BaseModel

from deepscale.config.compression import COMPRESSION_TECHNIQUES
from deepscale.config.errors import FeatureNotAvailableError
from deepscale.utils.logging import log_dist

AVAILABLE_ZERO_STAGES = {0, 1, 2, 3}


@dataclass(frozen=True)
class UnavailableFeature:
    """A setting that turns on a feature that is not built yet.

    Attributes:
        key: dotted attribute path on ``DeepScaleConfig`` (field names; dict keys also work).
        enabled: predicate on the value found at ``key``.
        feature: what is missing, e.g. ``"ZeRO stage 3"``.
        hint: how to run without it.
        label: key path shown to the user when it differs from ``key``. Default None.
        scope: dotted path of the settings that only matter once the feature
            exists (documented as "parsed only"). Default: the parent section
            for ``*.enabled`` keys, otherwise ``key`` itself.
    """

    key: str
    enabled: Callable[[Any], bool]
    feature: str
    hint: str
    label: Optional[str] = None
    scope: Optional[str] = None

    @property
    def scope_path(self) -> str:
        """The resolved ``scope``."""
        if self.scope is not None:
            return self.scope
        return self.key.rsplit(".", 1)[0] if self.key.endswith(".enabled") else self.key


def _on(value) -> bool:
    return bool(value)


def _is_set(value) -> bool:
    return value is not None


def _above_one(value) -> bool:
    return isinstance(value, int) and value > 1


def _offloaded(value) -> bool:
    return value is not None and value != "none"


def _off(key: str, feature: str) -> UnavailableFeature:
    return UnavailableFeature(key, _on, feature, f"set {key} to false")


def _section(key: str, feature: str) -> UnavailableFeature:
    return UnavailableFeature(key, _is_set, feature, f"remove the '{key}' section")


UNAVAILABLE_FEATURES: List[UnavailableFeature] = [
    UnavailableFeature("zero_optimization.stage", lambda v: v in (1, 2) and v not in AVAILABLE_ZERO_STAGES,
                       "ZeRO stage 1-2", "use stage 0"),
    UnavailableFeature("zero_optimization.stage", lambda v: v == 3 and v not in AVAILABLE_ZERO_STAGES,
                       "ZeRO stage 3", "use stage 0"),
    UnavailableFeature("zero_optimization.offload_optimizer.device", _offloaded, "ZeRO-Offload of optimizer states",
                       "set it to 'none' or remove offload_optimizer", scope="zero_optimization.offload_optimizer"),
    UnavailableFeature("zero_optimization.offload_param.device", _offloaded, "ZeRO-Offload of parameters",
                       "set it to 'none' or remove offload_param", scope="zero_optimization.offload_param"),
    _section("zero_optimization.zenflow", "ZenFlow offloading"),
    _off("fp16.fp16_master_weights_and_grads", "fp16 master weights (ZeRO stage 1-3)"),
    _off("bf16.bf16_master_weights_and_grads", "bf16 master weights (ZeRO stage 1-3)"),
    _off("bf16.bf16_optimizer_states", "bf16 optimizer states (ZeRO stage 1-3)"),
    UnavailableFeature("amp.enabled", _on, "NVIDIA Apex AMP", "use fp16 or bf16 instead"),
    UnavailableFeature("torch_autocast.enabled", _on, "torch.autocast mixed precision", "use fp16 or bf16 instead"),
    UnavailableFeature("pipeline.stages", _above_one, "pipeline parallelism", "use 1 or 'auto'"),
    UnavailableFeature("tensor_parallel.autotp_size", _above_one, "automatic tensor parallelism (AutoTP)",
                       "set it to 0"),
    UnavailableFeature("tensor_parallel.tensor_parallel.tp_size", _above_one, "tensor parallelism", "set it to 1",
                       label="tensor_parallel.tp.tp_size", scope="tensor_parallel.tensor_parallel"),
    UnavailableFeature("sequence_parallel_size", _above_one, "sequence parallelism (Ulysses)", "set it to 1"),
    _off("hybrid_engine.enabled", "the hybrid engine"),
    _off("flops_profiler.enabled", "the flops profiler"),
    *[UnavailableFeature(f"compression_training.{t}.shared_parameters.enabled", _on, f"compression training ({t})",
                         "set it to false", scope="compression_training") for t in COMPRESSION_TECHNIQUES],
    _off("compression_training.layer_reduction.enabled", "compression training (layer_reduction)"),
    _off("quantize_training.enabled", "MoQ quantization-aware training"),
    UnavailableFeature("weight_quantization.enabled", _on, "weight quantization",
                       "remove the 'weight_quantization' section"),
    _off("data_efficiency.enabled", "the data efficiency library (curriculum sampling, random-LTD)"),
    _off("curriculum_learning.enabled", "curriculum learning"),
    _off("elasticity.enabled", "elastic training"),
    _off("autotuning.enabled", "the autotuner"),
    _section("sparse_attention", "sparse attention"),
    _off("progressive_layer_drop.enabled", "progressive layer drop"),
    _off("eigenvalue.enabled", "eigenvalue computation"),
    _off("nebula.enabled", "Nebula checkpointing"),
    _section("datastates_ckpt", "DataStates asynchronous checkpointing"),
    _off("compile.deepcompile", "DeepCompile"),
]


@dataclass(frozen=True)
class TuningOnlyKeys:
    """Keys that are accepted but have no effect yet.

    Attributes:
        section: dotted raw-key path of the section, ``""`` for the top level.
        reason: why the keys have no effect.
        keys: only these keys of the section; empty means every key. Default ``()``.
        except_keys: keys of the section that are not covered. Default ``()``.
        applies: predicate on the config deciding whether the rule is active. Default always.
    """

    section: str
    reason: str
    keys: Tuple[str, ...] = ()
    except_keys: Tuple[str, ...] = ()
    applies: Callable[[Any], bool] = lambda cfg: True


TUNING_ONLY_KEYS: List[TuningOnlyKeys] = [
    # The data-parallel gradient reducer buckets by reduce_bucket_size at every stage.
    TuningOnlyKeys("zero_optimization", "it tunes ZeRO (stages 1-3; the stage3_* keys stage 3 only) and "
                   "zero_optimization.stage is 0",
                   except_keys=("stage", "reduce_bucket_size"), applies=lambda cfg: cfg.zero_optimization.stage == 0),
    TuningOnlyKeys("aio", "the engine uses it for NVMe offload, which is not built yet (deepscale.ops.aio handles "
                          "take these keys through AioConfig.from_dict)"),
    TuningOnlyKeys("activation_checkpointing", "deepscale.checkpointing (activation checkpointing) is not built yet"),
    TuningOnlyKeys("checkpoint", "this checkpoint option is not implemented yet"),
    TuningOnlyKeys("timers", "the throughput timer options are not implemented yet"),
    TuningOnlyKeys("pipeline", "pipeline parallelism is not built yet", except_keys=("stages",)),
    TuningOnlyKeys("tensor_parallel", "automatic tensor parallelism is not built yet",
                   except_keys=("autotp_size", "tp", "tensor_parallel")),
    TuningOnlyKeys("compile", "DeepCompile is not built yet", except_keys=("deepcompile",)),
    TuningOnlyKeys("optimizer", "DeepSpeed's legacy fused fp16 optimizer is not built", keys=("legacy_fusion",)),
    TuningOnlyKeys("", "it is a deprecated DeepSpeed switch with no effect", keys=("disable_allgather",)),
    TuningOnlyKeys("", "it is deprecated; use communication_data_type", keys=("fp32_allreduce",)),
    TuningOnlyKeys("", "DeepSpeed only uses it for a tensor-core alignment hint", keys=("vocabulary_size",)),
    TuningOnlyKeys("", "CUDA graph harvesting is not built yet", keys=("graph_harvesting",)),
    TuningOnlyKeys("", "sequence parallelism is not built yet", keys=("seq_parallel_communication_data_type",)),
    TuningOnlyKeys("", "mixture-of-experts (MoE) is not built yet", keys=("use_data_before_expert_parallelism",)),
    TuningOnlyKeys("", "it only applies with ZeRO-Offload, which is not built yet",
                   keys=("zero_force_ds_cpu_optimizer",)),
    TuningOnlyKeys("", "state dumps are not implemented yet", keys=("dump_state",)),
    TuningOnlyKeys("", "sparse embedding gradients are all-reduced densely in this version",
                   keys=("sparse_gradients",)),
    TuningOnlyKeys("bf16", "bf16 gradients always accumulate in an fp32 buffer, so it has no effect",
                   keys=("immediate_grad_update",)),
]


def _lookup(obj: Any, dotted: str) -> Any:
    """Follow a dotted path through attributes and dict keys; None when absent."""
    for part in dotted.split("."):
        if obj is None:
            return None
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def unavailable_feature_messages(cfg) -> List[str]:
    """One message per enabled feature that is not built yet."""
    messages = []
    for rule in UNAVAILABLE_FEATURES:
        value = _lookup(cfg, rule.key)
        if not rule.enabled(value):
            continue
        label = rule.label or rule.key
        subject = (f"the '{label}' section" if isinstance(value, (BaseModel, dict))
                   else f"{label}={_format_value(value)}")
        messages.append(f"{subject} requires {rule.feature}, which is not available in this version of "
                        f"deepscale yet; {rule.hint}")
    return messages


def tuning_only_keys_set(cfg) -> List[Tuple[str, str]]:
    """``(key path, reason)`` for every key the user set that has no effect yet."""
    found = []
    for rule in TUNING_ONLY_KEYS:
        section = _lookup(cfg.raw, rule.section) if rule.section else cfg.raw
        if not isinstance(section, dict) or not rule.applies(cfg):
            continue
        for key in section:
            if (rule.keys and key not in rule.keys) or key in rule.except_keys:
                continue
            path = f"{rule.section}.{key}" if rule.section else key
            found.append((path, rule.reason))
    return found


def check_feature_availability(cfg, warn: bool = True) -> List[str]:
    """Refuse features that are not built yet; warn about keys with no effect.

    Called by ``DeepScaleConfig.from_dict`` so the engine sees the error at
    ``initialize`` time.

    Args:
        cfg: a validated ``DeepScaleConfig``.
        warn: log (on rank 0) one warning per key that has no effect yet. Default True.

    Returns:
        The key paths that were accepted but have no effect yet.

    Raises:
        FeatureNotAvailableError: the config enables one or more missing
            features; the message has one line per feature.
    """
    messages = unavailable_feature_messages(cfg)
    if messages:
        raise FeatureNotAvailableError("\n".join(messages))
    ignored = tuning_only_keys_set(cfg)
    if warn:
        for path, reason in ignored:
            # Every rank parses the config; one copy of each warning is enough.
            log_dist(f"Config key '{path}' is accepted but has no effect yet: {reason}.", ranks=[0],
                     level=logging.WARNING)
    return [path for path, _ in ignored]

