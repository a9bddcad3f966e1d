"""Unknown keys, wrong types and out-of-range values each give one clear error."""
import pytest

from deepscale.config import DeepScaleConfig

BATCH = {"train_micro_batch_size_per_gpu": 1}


def _parse(**sections):
    return DeepScaleConfig.from_dict({**BATCH, **sections})


def _error(**sections) -> str:
    with pytest.raises(ValueError) as info:
        _parse(**sections)
    return str(info.value)


def test_unknown_top_level_key_suggests_closest():
    message = _error(zero_optimisation={"stage": 0})
    assert message == "Unknown config key 'zero_optimisation' (top level). Did you mean 'zero_optimization'?"


def test_unknown_nested_key_names_path_and_suggests():
    message = _error(fp16={"enabled": True, "loss_scale_windw": 100})
    assert message == ("Unknown config key 'loss_scale_windw' in section 'fp16' (full path "
                       "'fp16.loss_scale_windw'). Did you mean 'loss_scale_window'?")


def test_unknown_key_two_levels_deep():
    message = _error(zero_optimization={"offload_optimizer": {"device": "none", "pin_memroy": True}})
    assert "full path 'zero_optimization.offload_optimizer.pin_memroy'" in message
    assert "Did you mean 'pin_memory'?" in message


def test_unknown_key_suggests_stage3_alias():
    message = _error(zero_optimization={"stage3_prefetch_bucket_sise": 10})
    assert "Did you mean 'stage3_prefetch_bucket_size'?" in message


def test_unknown_key_without_close_match_lists_section_keys():
    message = _error(bf16={"enabled": False, "xyz": 1})
    assert "Unknown config key 'xyz' in section 'bf16'" in message
    assert "Valid keys here: bf16_master_weights_and_grads, bf16_optimizer_states, check_grad_overflow" in message


def test_unknown_key_without_close_match_at_top_level_points_to_docs():
    assert "See docs/config.md" in _error(qqqqqq=1)


def test_optimizer_argument_at_wrong_level_points_to_params():
    message = _error(optimizer={"type": "Adam", "lr": 0.1})
    assert "Arguments for 'optimizer' belong under 'optimizer.params'" in message


def test_all_unknown_keys_are_reported_together():
    lines = _error(fp17={}, zero_optimization={"stag": 0}).splitlines()
    assert len(lines) == 2
    assert "'fp17'" in lines[0] and "'zero_optimization.stag'" in lines[1]


@pytest.mark.parametrize("section, key, value, expected", [
    ("fp16", "loss_scale_window", "abc", "got 'abc' (string); expected an integer"),
    ("fp16", "loss_scale_window", 10.5, "got 10.5 (number); expected an integer"),
    ("fp16", "enabled", "false", "got 'false' (string); expected a boolean (true or false, or 0/1)"),
    ("fp16", "enabled", 2, "got 2 (integer); expected a boolean (true or false, or 0/1)"),
    ("fp16", "loss_scale", True, "got True (boolean); expected a number"),
    ("zero_optimization", "stage", "2", "got '2' (string); expected an integer"),
    ("zero_optimization", "stage", 4, "got 4 (integer); expected a value <= 3"),
    ("zero_optimization", "reduce_bucket_size", -5, "got -5 (integer); expected a value >= 0"),
    ("optimizer", "type", 7, "got 7 (integer); expected a string"),
    ("checkpoint", "tag_validation", "sometimes", "got 'sometimes' (string); expected one of 'WARN', 'IGNORE', 'FAIL'"),
])
def test_wrong_type_names_full_path_value_and_expected_type(section, key, value, expected):
    body = {key: value} if section != "optimizer" else {"type": value}
    message = _error(**{section: body})
    assert message == f"Invalid value for config key '{section}.{key}': {expected}."


def test_wrong_type_of_top_level_scalar():
    message = _error(gradient_clipping=[1.0])
    assert message == "Invalid value for config key 'gradient_clipping': got [1.0] (list); expected a number."


def test_section_that_is_not_an_object():
    assert "'fp16': got True (boolean); expected an object (a JSON dict)" in _error(fp16=True)


def test_auto_placeholder_gets_a_hint():
    message = _error(gradient_clipping="auto")
    assert "'auto' is a placeholder" in message and "Hugging Face Trainer" in message


def test_wrong_type_reported_under_the_alias_the_user_wrote():
    message = _error(zero_optimization={"stage3_max_live_parameters": "many"})
    assert "'zero_optimization.stage3_max_live_parameters': got 'many'" in message


def test_list_item_type_error_names_index():
    message = _error(comms_logger={"prof_ops": ["all_reduce", 3]})
    assert "'comms_logger.prof_ops[1]': got 3 (integer); expected a string" in message


def test_missing_required_key():
    assert _error(scheduler={"params": {}}) == "Missing required config key 'scheduler.type'."


def test_name_and_alias_given_together():
    message = _error(bf16={"enabled": False}, bfloat16={"enabled": False})
    assert message == "Config keys 'bf16' and 'bfloat16' are two names for the same setting; give only one."


def test_aliases_are_accepted():
    cfg = _parse(bfloat16={"enabled": True}, zero_optimization={"stage3_prefetch_bucket_size": 123},
                 tensor_parallel={"tp": {"tp_size": 1}})
    assert cfg.bf16_enabled and cfg.bf16.enabled
    assert cfg.zero_optimization.prefetch_bucket_size == 123
    assert cfg.tensor_parallel.tensor_parallel.tp_size == 1


def test_exponent_notation_integers_are_accepted():
    cfg = _parse(zero_optimization={"reduce_bucket_size": 2e8})
    assert cfg.zero_optimization.reduce_bucket_size == 200_000_000
    assert type(cfg.zero_optimization.reduce_bucket_size) is int


def test_choices_are_case_insensitive_and_normalised():
    cfg = _parse(checkpoint={"tag_validation": "Fail"}, communication_data_type="BF16",
                 data_types={"grad_accum_dtype": "float32"})
    assert cfg.checkpoint.tag_validation == "FAIL"
    assert cfg.communication_data_type == "bf16"
    assert cfg.data_types.grad_accum_dtype == "fp32"


def test_bad_dtype_name():
    message = _error(data_types={"grad_accum_dtype": "int8"})
    assert message == ("Invalid value for config key 'data_types.grad_accum_dtype': got 'int8' (string); "
                       "expected one of 'fp32', 'fp16', 'bf16'.")


def test_free_form_params_are_not_checked():
    # The factories check them against the constructor (test_config_leniency.py); only "auto" is refused here.
    cfg = _parse(optimizer={"type": "Lamb", "params": {"lr": 0.1, "anything_goes": [1, 2]}},
                 scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}})
    assert cfg.optimizer.params == {"lr": 0.1, "anything_goes": [1, 2]}
    assert cfg.scheduler.params["warmup_num_steps"] == 10


def test_amp_passes_extra_keys_through():
    cfg = _parse(amp={"enabled": False, "opt_level": "O1"})
    assert cfg.amp.extra_params == {"opt_level": "O1"}


def test_legacy_boolean_zero_section():
    assert _parse(zero_optimization=False).zero_stage == 0


def test_deprecated_cpu_offload_maps_to_offload_optimizer():
    assert _parse(zero_optimization={"stage": 2, "cpu_offload": True}).zero_optimization.offload_optimizer.device == "cpu"


def test_overlap_comm_default_depends_on_stage():
    assert _parse().zero_optimization.overlap_comm is False
    assert _parse(zero_optimization={"overlap_comm": True}).zero_optimization.overlap_comm is True


def test_non_dict_config_is_a_type_error():
    with pytest.raises(TypeError, match="config must be a dict, got list"):
        DeepScaleConfig.from_dict([("train_batch_size", 8)])


def test_input_dict_is_not_modified():
    source = {"train_batch_size": 8, "zero_optimization": False}
    cfg = DeepScaleConfig.from_dict(source)
    assert source == {"train_batch_size": 8, "zero_optimization": False}
    assert cfg.raw == source and cfg.raw is not source
