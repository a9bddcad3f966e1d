"""Which config features this version of deepscale has built.

Every DeepSpeed section is parsed and validated, but some switch on features
that do not exist here yet. Two tables decide what happens:

* ``UNAVAILABLE_FEATURES``: settings that turn on a missing feature. Enabling
  one raises ``FeatureNotAvailableError`` naming the key and the feature, so a
  run never silently trains without something it asked for.
* ``TUNING_ONLY_KEYS``: keys that only tune a missing feature (or are
  DeepSpeed leftovers with no effect). They are accepted with one warning per
  key the user actually wrote. ``ZERO_KEYS_IGNORED`` (part of it) lists the
  ``zero_optimization`` keys each ZeRO stage does not read.

``docs/config.md`` is generated from these tables (``reference.py``), so a
statement there about what is available cannot drift from what the code
checks. When a feature lands, edit these tables (for ZeRO,
``AVAILABLE_ZERO_STAGES``) in the same change and regenerate the page.
"""
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, FrozenSet, List, Optional, Tuple, Union

from pydantic import BaseModel

from deepscale.config.compression import COMPRESSION_TECHNIQUES
from deepscale.config.errors import FeatureNotAvailableError
from deepscale.config.zero import ZeroConfig
from deepscale.utils.logging import log_dist

AVAILABLE_ZERO_STAGES = {0, 1, 2, 3}


@dataclass(frozen=True)
class UnavailableFeature:
    """A setting that turns on a feature that is not built yet.

    Attributes:
        key: dotted attribute path on ``DeepScaleConfig`` (field names; dict keys also work).
        enabled: predicate on the value found at ``key``.
        feature: what is missing, e.g. ``"ZeRO-Offload of parameters"``, or a function of the value.
        hint: how to run without it (text, or a function of the value).
        label: key path shown to the user when it differs from ``key``. Default None.
        scope: dotted path of the settings that only matter once the feature
            exists (documented as "parsed only"). Default: the parent section
            for ``*.enabled`` keys, otherwise ``key`` itself.
        values: example values of the key; the generated docs say which of them
            are supported and which are refused, by asking ``enabled``. Default ``()``.
        applies: predicate on the whole config; the rule is checked only where it
            holds (e.g. only at ZeRO stage 3). Default always.
        when: what ``applies`` means, for messages and docs, e.g.
            ``"at zero_optimization.stage 3"``. Default ``""``.
    """

    key: str
    enabled: Callable[[Any], bool]
    feature: Union[str, Callable[[Any], str]]
    hint: Union[str, Callable[[Any], str]]
    label: Optional[str] = None
    scope: Optional[str] = None
    values: Tuple[Any, ...] = ()
    applies: Callable[[Any], bool] = lambda cfg: True
    when: str = ""

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


def _off(key: str, feature: str) -> UnavailableFeature:
    return UnavailableFeature(key, _on, feature, f"set {key} to false")


def _section(key: str, feature: str) -> UnavailableFeature:
    return UnavailableFeature(key, _is_set, feature, f"remove the '{key}' section")


def _zero_stage_unavailable(value) -> bool:
    # Reads the table at call time, so marking a stage built is a one-line edit of it.
    return isinstance(value, int) and value not in AVAILABLE_ZERO_STAGES


def _use_available_stages(value) -> str:
    stages = sorted(AVAILABLE_ZERO_STAGES)
    listed = ", ".join(map(str, stages[:-1])) + f" or {stages[-1]}" if len(stages) > 1 else str(stages[0])
    return f"use stage {listed}"


def _at_zero_stage_3(cfg) -> bool:
    return cfg.zero_optimization.stage == 3


UNAVAILABLE_FEATURES: List[UnavailableFeature] = [
    UnavailableFeature("zero_optimization.stage", _zero_stage_unavailable, lambda v: f"ZeRO stage {v}",
                       _use_available_stages, values=(0, 1, 2, 3)),
    # Stage 3 reduce-scatters without the pre-division (the averaged gradient is the same), and it
    # tolerates parameters that get no gradient; refusing beats silently doing something else.
    UnavailableFeature("prescale_gradients", _on, "gradient pre-division in the ZeRO stage 3 reduce-scatter",
                       "set prescale_gradients to false (the averaged gradients are the same) or use ZeRO stage 0-2",
                       values=(False, True), applies=_at_zero_stage_3, when="at zero_optimization.stage 3",
                       scope="prescale_gradients"),
    UnavailableFeature("zero_optimization.ignore_unused_parameters", lambda v: v is False,
                       "an unused-parameter check at ZeRO stage 3",
                       "set it to true (stage 3 trains models whose parameters get no gradient) or use ZeRO stage 1-2",
                       values=(True, False),
                       applies=_at_zero_stage_3, when="at zero_optimization.stage 3",
                       scope="zero_optimization.ignore_unused_parameters"),
    _section("zero_optimization.zenflow", "ZenFlow offloading"),
    _off("fp16.fp16_master_weights_and_grads", "fp16 master weights and gradients (masters kept in fp16, not fp32)"),
    _off("bf16.bf16_master_weights_and_grads", "bf16 master weights and gradients (masters kept in bf16, not fp32)"),
    _off("bf16.bf16_optimizer_states", "bf16 optimizer states (optimizer state kept in bf16, not fp32)"),
    UnavailableFeature("amp.enabled", _on, "NVIDIA Apex AMP", "use fp16 or bf16 instead"),
    UnavailableFeature("torch_autocast.enabled", _on, "torch.autocast mixed precision", "use fp16 or bf16 instead"),
    _off("hybrid_engine.enabled", "the hybrid engine"),
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
        zero_stages: the rule holds only at these values of ``zero_optimization.stage``;
            None means at every stage. Default None.
        unless: predicate on the whole config; where it holds the rule does not (the keys
            take effect). Default None.
    """

    section: str
    reason: str
    keys: Tuple[str, ...] = ()
    except_keys: Tuple[str, ...] = ()
    zero_stages: Optional[FrozenSet[int]] = None
    unless: Optional[Callable[[Any], bool]] = None

    def applies(self, cfg) -> bool:
        """Whether the rule holds for ``cfg`` (its ZeRO stage, ``unless``)."""
        if self.unless is not None and self.unless(cfg):
            return False
        return self.zero_stages is None or cfg.zero_optimization.stage in self.zero_stages

    def covers(self, section: str, key: str) -> bool:
        """Whether raw key ``key`` of ``section`` is one of this rule's keys."""
        return (section == self.section and (not self.keys or key in self.keys)
                and key not in self.except_keys)


def _zero_keys(*names: str) -> Tuple[str, ...]:
    """Field names of ``zero_optimization`` with their DeepSpeed spellings (``stage3_*``)."""
    keys = []
    for name in names:
        field = ZeroConfig.model_fields[name]  # a typo here fails at import, not silently
        keys.extend([name] + ([field.alias] if field.alias else []))
    return tuple(keys)


_STAGES_1_TO_3 = frozenset({1, 2, 3})


def _nvme_offload(cfg) -> bool:
    zero = cfg.zero_optimization
    return any(getattr(getattr(zero, key, None), "device", "none") == "nvme"
               for key in ("offload_optimizer", "offload_param"))

# What each ZeRO stage above 0 reads from zero_optimization, as the inverse: keys written at a
# stage that does not use them get one warning each. (Stage 0 uses only ``stage`` and
# ``reduce_bucket_size``; the first TUNING_ONLY_KEYS rule covers it.) Keys whose behaviour is
# always on here are not listed: ``contiguous_gradients`` (gradients always live in flat
# buffers), ``elastic_checkpoint`` (checkpoints always reload at any world size),
# ``load_from_fp32_weights`` (loading always restores the fp32 masters).
ZERO_KEYS_IGNORED = [
    TuningOnlyKeys("zero_optimization", "ZeRO++ (quantized weights and gradients, hierarchical partitioning) and "
                   "MiCS are not built yet", zero_stages=_STAGES_1_TO_3,
                   keys=_zero_keys("zero_quantized_weights", "zero_quantized_nontrainable_weights",
                                   "zero_quantized_gradients", "zero_hpz_partition_size", "zeropp_loco_param",
                                   "mics_shard_size", "mics_hierarchical_params_gather")),
    TuningOnlyKeys("zero_optimization", "it applies to ZeRO stage 3 only", zero_stages=frozenset({1, 2}),
                   keys=_zero_keys("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters",
                                   "max_reuse_distance", "gather_16bit_weights_on_model_save",
                                   "debug_sequence_check", "offload_param",
                                   "stage3_gather_fp16_weights_on_model_save")),
    TuningOnlyKeys("zero_optimization", "it applies to ZeRO stages 1-2 only (stage 3 gathers parameters by module "
                   "and always overlaps its reduce-scatters with backward)", zero_stages=frozenset({3}),
                   keys=_zero_keys("allgather_bucket_size", "allgather_partitions", "reduce_scatter",
                                   "overlap_comm")),
    TuningOnlyKeys("zero_optimization", "this ZeRO option is not implemented in this version",
                   zero_stages=_STAGES_1_TO_3,
                   keys=_zero_keys("round_robin_gradients", "use_multi_rank_bucket_allreduce",
                                   "legacy_stage1", "model_persistence_threshold", "module_granularity_threshold",
                                   "use_all_reduce_for_fetch_params", "allgather_sequential", "leaf_module",
                                   "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
                                   "log_trace_cache_warnings", "enable_sanity_checks",
                                   "save_muon_momentum_buffer_in_memory")),
]


TUNING_ONLY_KEYS: List[TuningOnlyKeys] = [
    # The data-parallel gradient reducer buckets by reduce_bucket_size at every stage.
    TuningOnlyKeys("zero_optimization", "it tunes ZeRO (stages 1-3; the stage3_* keys stage 3 only) and "
                   "zero_optimization.stage is 0",
                   except_keys=("stage", "reduce_bucket_size", "watchdog_timeout"), zero_stages=frozenset({0})),
    *ZERO_KEYS_IGNORED,
    TuningOnlyKeys("aio", "it tunes NVMe offload and no offload device is 'nvme'", unless=_nvme_offload),
    TuningOnlyKeys("zero_optimization.offload_optimizer", "states are always created at the first step (the fast "
                   "path), and the CPU optimizer uses the rank's torch threads", keys=("fast_init", "cpuadam_cores_perc")),
    TuningOnlyKeys("zero_optimization.offload_optimizer", "SuperOffload and optimizer buffer sizes are not "
                   "implemented in this version", keys=("super_offload", "buffer_size")),
    TuningOnlyKeys("checkpoint", "universal checkpoints (DeepSpeed's included) are detected and loaded "
                   "automatically, so it is not needed", keys=("load_universal",)),
    TuningOnlyKeys("checkpoint", "this checkpoint option is not implemented yet"),
    TuningOnlyKeys("timers", "the throughput timer options are not implemented yet"),
    TuningOnlyKeys("pipeline", "PipelineModule's arguments decide it (partition_method, seed_layers, "
                   "activation_checkpoint_interval), as in DeepSpeed",
                   keys=("partition", "seed_layers", "activation_checkpoint_interval", "use_reentrant")),
    TuningOnlyKeys("pipeline", "activations and their gradients cross stages whole on every tensor-parallel rank "
                   "(not partitioned over the tensor-parallel group)", keys=("pipe_partitioned", "grad_partitioned")),
    TuningOnlyKeys("tensor_parallel", "training AutoTP keeps the engine's precision (fp16/bf16 sections) and "
                   "has no kernel injection", except_keys=("autotp_size", "tp", "tensor_parallel")),
    *[TuningOnlyKeys(f"tensor_parallel.{name}", "AutoTP splits heads and features as evenly as the layout allows",
                     keys=("tp_grain_size",)) for name in ("tp", "tensor_parallel")],
    TuningOnlyKeys("compile", "DeepCompile is not built yet", except_keys=("deepcompile",)),
    TuningOnlyKeys("optimizer", "DeepSpeed's legacy fused fp16 optimizer is not built", keys=("legacy_fusion",)),
    TuningOnlyKeys("", "it is a deprecated DeepSpeed switch with no effect", keys=("disable_allgather",)),
    TuningOnlyKeys("", "it is deprecated; use communication_data_type", keys=("fp32_allreduce",)),
    TuningOnlyKeys("", "DeepSpeed only uses it for a tensor-core alignment hint", keys=("vocabulary_size",)),
    TuningOnlyKeys("", "CUDA graph harvesting is not built yet", keys=("graph_harvesting",)),
    TuningOnlyKeys("", "Ulysses all-to-alls run in the activation dtype", keys=("seq_parallel_communication_data_type",)),
    TuningOnlyKeys("", "an offloaded step always uses deepscale's CPU optimizer where one fits (Adam, AdamW, Adagrad, "
                   "Lion) and the optimizer's own step on the host otherwise", keys=("zero_force_ds_cpu_optimizer",)),
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


def _text(text: Union[str, Callable[[Any], str]], value: Any) -> str:
    return text(value) if callable(text) else text


def refusal_message(rule: UnavailableFeature, value: Any) -> str:
    """The error line for ``rule`` when its key holds ``value`` (also used for the docs' example)."""
    label = rule.label or rule.key
    subject = (f"the '{label}' section" if isinstance(value, (BaseModel, dict))
               else f"{label}={_format_value(value)}")
    when = f" {rule.when}" if rule.when else ""
    return (f"{subject}{when} requires {_text(rule.feature, value)}, which is not available in this version of "
            f"deepscale yet; {_text(rule.hint, value)}")


def unavailable_feature_messages(cfg) -> List[str]:
    """One message per enabled feature that is not built yet."""
    messages = []
    for rule in UNAVAILABLE_FEATURES:
        value = _lookup(cfg, rule.key)
        if rule.enabled(value) and rule.applies(cfg):
            messages.append(refusal_message(rule, value))
    return messages


def tuning_only_keys_set(cfg) -> List[Tuple[str, str]]:
    """``(key path, reason)`` for every key the user set that has no effect yet (first rule wins)."""
    found = {}
    for rule in TUNING_ONLY_KEYS:
        section = _lookup(cfg.raw, rule.section) if rule.section else cfg.raw
        if not isinstance(section, dict) or not rule.applies(cfg):
            continue
        for key in section:
            if rule.covers(rule.section, key):
                found.setdefault(f"{rule.section}.{key}" if rule.section else key, rule.reason)
    return list(found.items())


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

