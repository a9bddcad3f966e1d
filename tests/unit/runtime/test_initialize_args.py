"""initialize() argument mistakes keep DeepSpeed's contract: callers catch them as AssertionError,
and they are ValueErrors with a full message too."""
import argparse
import json

import pytest
import torch

import deepscale
from deepscale.config import InitializeArgumentError
from engine_test_models import base_config, make_model


def test_error_type_is_both_value_error_and_assertion_error():
    assert issubclass(InitializeArgumentError, ValueError) and issubclass(InitializeArgumentError, AssertionError)


def test_model_none_is_caught_as_assertion_error():
    with pytest.raises(AssertionError, match="model is required"):
        deepscale.initialize(model=None, config=base_config())
    with pytest.raises(ValueError, match="model is required"):
        deepscale.initialize(config=base_config())


def test_model_passed_positionally_names_the_mistake():
    with pytest.raises(AssertionError) as info:
        deepscale.initialize(make_model(), config=base_config())
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "first positional argument, which is 'args'" in message and "initialize(model=" in message


def test_no_config_is_caught_as_assertion_error():
    with pytest.raises(AssertionError, match="No DeepScale config was given"):
        deepscale.initialize(model=make_model())


def test_two_configs_are_caught_as_assertion_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base_config()))
    args = argparse.Namespace(deepspeed_config=str(path))
    with pytest.raises(AssertionError, match=r"given twice \(config and args.deepspeed_config\)"):
        deepscale.initialize(args=args, model=make_model(), config=base_config())


def test_args_naming_two_different_files_is_caught_as_assertion_error(tmp_path):
    args = argparse.Namespace(deepscale_config=str(tmp_path / "a.json"), deepspeed_config=str(tmp_path / "b.json"))
    with pytest.raises(AssertionError, match="name different files"):
        deepscale.initialize(args=args, model=make_model())


def test_a_non_module_model_stays_a_type_error():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        deepscale.initialize(model=torch.zeros(2), config=base_config())


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_without_an_optimizer_is_caught_as_assertion_error(stage):
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
    with pytest.raises(AssertionError, match=f"zero_optimization.stage={stage} .* needs an optimizer"):
        deepscale.initialize(model=make_model(), config=cfg)
