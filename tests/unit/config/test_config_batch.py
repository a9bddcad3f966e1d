"""The batch triad: derivations and the arithmetic shown in errors."""
import pytest

from deepscale.config import DeepScaleConfig, resolve_batch_sizes


@pytest.mark.parametrize("tbs, mbs, gas, dp, expected", [
    (32, 4, 2, 4, (32, 4, 2)),      # all three, consistent
    (32, 4, None, 2, (32, 4, 4)),   # tbs + micro -> gas
    (32, None, 4, 2, (32, 4, 4)),   # tbs + gas -> micro
    (None, 4, 3, 2, (24, 4, 3)),    # micro + gas -> tbs
    (32, None, None, 4, (32, 8, 1)),  # only tbs -> gas 1
    (None, 5, None, 3, (15, 5, 1)),   # only micro -> gas 1
    (7, None, None, 1, (7, 7, 1)),    # default dp is 1
])
def test_derivations(tbs, mbs, gas, dp, expected):
    assert resolve_batch_sizes(tbs, mbs, gas, dp) == expected


def test_results_are_plain_ints_on_the_config():
    cfg = DeepScaleConfig.from_dict({"train_batch_size": 64.0, "train_micro_batch_size_per_gpu": 8}, dp_world_size=2)
    values = (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps)
    assert values == (64, 8, 4)
    assert all(type(v) is int for v in values)


def test_inconsistent_triad_shows_the_arithmetic():
    with pytest.raises(ValueError) as info:
        DeepScaleConfig.from_dict({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                                   "gradient_accumulation_steps": 2}, dp_world_size=2)
    assert ("train_batch_size (32) != train_micro_batch_size_per_gpu (4) * gradient_accumulation_steps (2) "
            "* data-parallel size (2) = 16") in str(info.value)


@pytest.mark.parametrize("tbs, mbs, gas, dp, expected", [
    (30, 4, None, 2, "train_batch_size (30) is not divisible by train_micro_batch_size_per_gpu (4) * "
                     "data-parallel size (2) = 8, so gradient_accumulation_steps cannot be derived"),
    (30, None, 4, 2, "train_batch_size (30) is not divisible by gradient_accumulation_steps (4) * "
                     "data-parallel size (2) = 8, so train_micro_batch_size_per_gpu cannot be derived"),
    (10, None, None, 4, "train_batch_size (10) is not divisible by gradient_accumulation_steps (1) * "
                        "data-parallel size (4) = 4"),
])
def test_non_divisible(tbs, mbs, gas, dp, expected):
    with pytest.raises(ValueError) as info:
        resolve_batch_sizes(tbs, mbs, gas, dp)
    assert expected in str(info.value)


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu",
                                 "gradient_accumulation_steps"])
@pytest.mark.parametrize("value", [0, -2])
def test_values_below_one(key, value):
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1}
    config[key] = value
    with pytest.raises(ValueError, match=f"{key} must be >= 1, got {value}"):
        DeepScaleConfig.from_dict(config)


@pytest.mark.parametrize("config, detail", [
    ({}, ""),
    ({"gradient_accumulation_steps": 4}, "only gradient_accumulation_steps=4 was given"),
])
def test_neither_batch_nor_micro_batch(config, detail):
    with pytest.raises(ValueError) as info:
        DeepScaleConfig.from_dict(config)
    message = str(info.value)
    assert "set train_batch_size or train_micro_batch_size_per_gpu" in message
    assert detail in message


@pytest.mark.parametrize("dp, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_dp_world_size(dp, error):
    with pytest.raises(error, match="dp_world_size"):
        DeepScaleConfig.from_dict({"train_batch_size": 8}, dp_world_size=dp)


def test_triad_types_are_checked_before_arithmetic():
    with pytest.raises(ValueError, match="'gradient_accumulation_steps': got 1.5 \\(number\\); expected an integer"):
        DeepScaleConfig.from_dict({"train_batch_size": 8, "gradient_accumulation_steps": 1.5})
