"""Features that are not built yet: refused when enabled, tuning keys accepted with a warning."""
import logging

import pytest

from deepscale.config import (DeepScaleConfig, FeatureNotAvailableError, check_feature_availability, features)
from deepscale.utils.logging import logger

BATCH = {"train_micro_batch_size_per_gpu": 1}


def _parse(**sections):
    return DeepScaleConfig.from_dict({**BATCH, **sections})


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_seen():
    # Attached to the package logger itself, so it sees records whatever the root logger does.
    handler = _Records()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_zero_stage_message_matches_the_documented_form(monkeypatch):
    monkeypatch.setattr(features, "AVAILABLE_ZERO_STAGES", {0, 1, 2})  # as before stage 3 was built
    with pytest.raises(FeatureNotAvailableError) as info:
        _parse(zero_optimization={"stage": 3})
    assert str(info.value) == ("zero_optimization.stage=3 requires ZeRO stage 3, which is not available in "
                               "this version of deepscale yet; use stage 0, 1 or 2")


def test_feature_error_is_a_value_error():
    assert issubclass(FeatureNotAvailableError, ValueError)


@pytest.mark.parametrize("sections, key, feature", [
    ({"zero_optimization": {"zenflow": {}}}, "the 'zero_optimization.zenflow' section", "ZenFlow"),
    ({"compression_training": {"sparse_pruning": {"shared_parameters": {"enabled": True}}}},
     "compression_training.sparse_pruning.shared_parameters.enabled=true", "compression training"),
    ({"compression_training": {"layer_reduction": {"enabled": True}}},
     "compression_training.layer_reduction.enabled=true", "compression training"),
    ({"curriculum_learning": {"enabled": True}}, "curriculum_learning.enabled=true", "curriculum learning"),
    ({"data_efficiency": {"enabled": True}}, "data_efficiency.enabled=true", "data efficiency"),
    ({"elasticity": {"enabled": True}}, "elasticity.enabled=true", "elastic training"),
    ({"autotuning": {"enabled": True}}, "autotuning.enabled=true", "autotuner"),
    ({"sparse_attention": {"mode": "fixed"}}, "the 'sparse_attention' section", "sparse attention"),
    ({"hybrid_engine": {"enabled": True}}, "hybrid_engine.enabled=true", "hybrid engine"),
    ({"amp": {"enabled": True, "opt_level": "O1"}}, "amp.enabled=true", "Apex AMP"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "torch_autocast.enabled=true", "autocast"),
    ({"nebula": {"enabled": True}}, "nebula.enabled=true", "Nebula"),
    ({"datastates_ckpt": {"host_cache_size": 16}}, "the 'datastates_ckpt' section", "DataStates"),
    ({"progressive_layer_drop": {"enabled": True}}, "progressive_layer_drop.enabled=true", "progressive layer drop"),
    ({"eigenvalue": {"enabled": True}}, "eigenvalue.enabled=true", "eigenvalue"),
    ({"quantize_training": {"enabled": True}}, "quantize_training.enabled=true", "MoQ"),
    ({"weight_quantization": {"num_bits": 4}}, "weight_quantization.enabled=true", "weight quantization"),
    ({"compile": {"deepcompile": True}}, "compile.deepcompile=true", "DeepCompile"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
     "fp16.fp16_master_weights_and_grads=true", "masters kept in fp16"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
     "bf16.bf16_master_weights_and_grads=true", "masters kept in bf16"),
])
def test_enabling_an_unbuilt_feature_is_refused(sections, key, feature):
    with pytest.raises(FeatureNotAvailableError) as info:
        _parse(**sections)
    message = str(info.value)
    assert message.startswith(f"{key} requires ")
    assert feature in message and "not available in this version of deepscale yet" in message


def test_disabled_sections_of_unbuilt_features_parse_silently(warnings_seen):
    cfg = _parse(tensorboard={"enabled": False, "output_path": "runs/"}, elasticity={"enabled": False},
                 flops_profiler={"enabled": False, "profile_step": 5}, pipeline={"stages": 1},
                 tensor_parallel={"autotp_size": 1}, zero_optimization={"offload_optimizer": {"device": "none"}})
    assert cfg.tensorboard.output_path == "runs/" and cfg.flops_profiler.profile_step == 5
    assert not any("tensorboard" in m or "elasticity" in m or "flops_profiler" in m for m in warnings_seen)


def test_several_unbuilt_features_are_listed_together():
    with pytest.raises(FeatureNotAvailableError) as info:
        _parse(hybrid_engine={"enabled": True}, elasticity={"enabled": True})
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("hybrid_engine.enabled=true") and lines[1].startswith("elasticity.enabled=true")


def test_tuning_only_keys_warn_once_each(warnings_seen):
    cfg = _parse(aio={"block_size": 1048576, "queue_depth": 16},
                 zero_optimization={"stage": 0, "allgather_bucket_size": 5e8, "reduce_bucket_size": 2e8},
                 activation_checkpointing={"partition_activations": True},
                 comms_logger={"enabled": True}, checkpoint={"load_universal": False})
    # comms_logger is built, so it is not reported.
    expected = ["zero_optimization.allgather_bucket_size", "aio.block_size", "aio.queue_depth",
                "checkpoint.load_universal"]
    assert cfg.ignored_keys == expected
    for key in expected:
        assert sum(f"'{key}'" in m for m in warnings_seen) == 1, key
    # The gradient reducer uses reduce_bucket_size at stage 0, so it is not reported.
    assert not any("reduce_bucket_size" in m for m in warnings_seen)


def test_keys_left_at_their_default_spelling_are_not_reported_when_absent(warnings_seen):
    cfg = _parse(fp16={"enabled": True})
    assert cfg.ignored_keys == [] and warnings_seen == []


def test_check_feature_availability_can_be_rerun_without_warnings(warnings_seen):
    cfg = _parse(aio={"block_size": 4096})
    warnings_seen.clear()
    assert check_feature_availability(cfg, warn=False) == ["aio.block_size"]
    assert warnings_seen == []


def test_available_zero_stages_is_the_single_switch(monkeypatch):
    # Marking stages as built is a one-line edit of the table; the rules read it.
    monkeypatch.setattr(features, "AVAILABLE_ZERO_STAGES", {0, 1, 2})
    cfg = _parse(zero_optimization={"stage": 2, "allgather_bucket_size": 5e8})
    assert cfg.zero_stage == 2 and cfg.zero_enabled
    assert cfg.ignored_keys == []  # bucket sizes matter once a stage > 0 runs
    with pytest.raises(FeatureNotAvailableError, match="requires ZeRO stage 3"):
        _parse(zero_optimization={"stage": 3})
