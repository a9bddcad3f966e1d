"""What DeepSpeed accepts and we accept too (0/1 booleans, hjson files), and the free-form
parts of a config ("auto", optimizer/scheduler arguments) failing with errors that name the key."""
import sys
import typing

import pytest
import torch
from pydantic import TypeAdapter


from deepscale.config import DeepScaleConfig, load_config_dict
from deepscale.config.config import DeepScaleConfig as _Top
from deepscale.config.errors import nested_model
from deepscale.config.params import check_call_kwargs

BATCH = {"train_micro_batch_size_per_gpu": 1}


def _bool_fields(model_cls, prefix=()):
    """(section class, field name, key path) for every Bool field of the whole config tree."""
    for name, field in model_cls.model_fields.items():
        sub = nested_model(field.annotation)
        if sub is not None:
            yield from _bool_fields(sub, prefix + (name,))
        elif field.annotation is bool or bool in typing.get_args(field.annotation):
            yield model_cls, name, ".".join(prefix + (name,))


BOOL_FIELDS = list(_bool_fields(_Top))


def test_the_config_has_many_bool_fields():
    assert len(BOOL_FIELDS) > 50  # the walk below really covers the tree


@pytest.mark.parametrize("number, expected", [(0, False), (1, True)])
def test_every_bool_field_accepts_0_and_1(number, expected):
    wrong = []
    for model_cls, name, path in BOOL_FIELDS:
        field = model_cls.model_fields[name]
        value = TypeAdapter(typing.Annotated[(field.annotation, *field.metadata)]).validate_python(number)
        if value is not expected:
            wrong.append(path)
    assert wrong == []


def test_int_bools_in_a_full_config():
    cfg = DeepScaleConfig.from_dict({**BATCH, "zero_allow_untested_optimizer": 1, "fp16": {"enabled": 1},
                                     "wall_clock_breakdown": 0})
    assert cfg.zero_allow_untested_optimizer is True and cfg.fp16.enabled is True
    assert cfg.wall_clock_breakdown is False and cfg.raw["zero_allow_untested_optimizer"] == 1


@pytest.mark.parametrize("value, shown", [(2, "2 (integer)"), (0.0, "0.0 (number)"), ("true", "'true' (string)"),
                                          (None, "None (null)")])
def test_other_values_for_a_bool_stay_errors(value, shown):
    with pytest.raises(ValueError) as info:
        DeepScaleConfig.from_dict({**BATCH, "fp16": {"enabled": value}})
    assert str(info.value) == (f"Invalid value for config key 'fp16.enabled': got {shown}; expected a boolean "
                               "(true or false, or 0/1).")


def test_unknown_keys_stay_errors_with_int_bools():
    with pytest.raises(ValueError, match="Did you mean 'zero_allow_untested_optimizer'"):
        DeepScaleConfig.from_dict({**BATCH, "zero_allow_untested_optimiser": 1})


# --- hjson ----------------------------------------------------------------------------------
HJSON_TEXT = """{
  # DeepSpeed reads hjson: comments, unquoted keys and strings, optional commas
  train_micro_batch_size_per_gpu: 2
  gradient_accumulation_steps: 3,
  fp16: {
    enabled: true  // trailing comment
    loss_scale_window: 500,
  }
  optimizer: {
    type: AdamW
    params: {lr: 0.001, betas: [0.9, 0.95,]}
  }
}
"""


def test_hjson_file_is_read(tmp_path):
    pytest.importorskip("hjson", reason="hjson is an optional package")
    path = tmp_path / "ds_config.hjson"
    path.write_text(HJSON_TEXT)
    cfg = DeepScaleConfig.from_source(config=str(path))
    assert (cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (2, 3)
    assert cfg.fp16.enabled and cfg.fp16.loss_scale_window == 500
    assert cfg.optimizer.type == "AdamW" and cfg.optimizer.params == {"lr": 0.001, "betas": [0.9, 0.95]}


def test_hjson_duplicate_key_is_refused(tmp_path):
    pytest.importorskip("hjson", reason="hjson is an optional package")
    path = tmp_path / "ds.hjson"
    path.write_text("{\n  train_batch_size: 8\n  train_batch_size: 16\n}\n")
    with pytest.raises(ValueError, match="duplicate key 'train_batch_size'"):
        load_config_dict(config=path)


def test_neither_json_nor_hjson_shows_line_and_column(tmp_path):
    pytest.importorskip("hjson", reason="hjson is an optional package")
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true]\n}\n')
    with pytest.raises(ValueError) as info:
        load_config_dict(config=path)
    message = str(info.value)
    assert "is neither valid JSON nor valid hjson" in message and "line 3" in message
    assert '"fp16": {"enabled": true]' in message and "^" in message


def test_without_hjson_a_non_json_file_says_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hjson", None)  # import hjson now raises ImportError
    path = tmp_path / "ds.hjson"
    path.write_text(HJSON_TEXT)
    with pytest.raises(ValueError) as info:
        load_config_dict(config=path)
    message = str(info.value)
    assert "is not valid JSON" in message and "line 2" in message
    assert "pip install hjson" in message


def test_without_hjson_plain_json_still_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hjson", None)
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 4}')
    assert load_config_dict(config=path) == {"train_batch_size": 4}


# --- "auto" and free-form arguments ---------------------------------------------------------
@pytest.mark.parametrize("sections, paths", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}},
     ["optimizer.params.lr", "optimizer.params.weight_decay"]),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, "auto"]}}}, ["optimizer.params.betas[1]"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto"}}},
     ["scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps"]),
    ({"amp": {"enabled": False, "opt_level": "auto"}}, ["amp.opt_level"]),
    ({"zero_optimization": {"zeropp_loco_param": {"err_beta": "auto"}}},
     ["zero_optimization.zeropp_loco_param.err_beta"]),
])
def test_auto_in_free_form_sections_names_every_key(sections, paths):
    with pytest.raises(ValueError) as info:
        DeepScaleConfig.from_dict({**BATCH, **sections})
    lines = str(info.value).splitlines()
    assert lines[:-1] == [f"Invalid value for config key '{p}': got 'auto' (string)." for p in paths]
    assert "'auto' is a placeholder" in lines[-1] and "Hugging Face Trainer" in lines[-1]


@pytest.mark.parametrize("key", ["train_batch_size", "gradient_accumulation_steps", "gradient_clipping"])
def test_auto_in_typed_keys_names_the_key(key):
    with pytest.raises(ValueError) as info:
        DeepScaleConfig.from_dict({**BATCH, key: "auto"})
    assert f"'{key}': got 'auto' (string)" in str(info.value) and "placeholder" in str(info.value)


def test_auto_where_deepspeed_defines_it_is_still_accepted():
    cfg = DeepScaleConfig.from_dict({**BATCH, "pipeline": {"stages": "auto"},
                                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert cfg.pipeline.stages == "auto"


@pytest.mark.parametrize("section, name, params, expected", [
    ("optimizer", "AdamW", {"lr": "abc"}, "'optimizer.params.lr': got 'abc' (string); expected a number."),
    ("optimizer", "Adam", {"betas": [0.9]}, "'optimizer.params.betas': got [0.9] (list); expected a list of 2 numbers."),
    ("optimizer", "SGD", {"lr": 0.1, "momentum": "high"},
     "'optimizer.params.momentum': got 'high' (string); expected a number."),
    ("optimizer", "AdamW", {"amsgrad": "yes"},
     "'optimizer.params.amsgrad': got 'yes' (string); expected a boolean (true or false, or 0/1)."),
    ("optimizer", "RMSprop", {"alpha": [1]}, "'optimizer.params.alpha': got [1] (list); expected a number."),
    ("optimizer", "Lion", {"lr": None, "weight_decay": "0.1"},
     "'optimizer.params.weight_decay': got '0.1' (string); expected a number."),
    ("scheduler", "StepLR", {"step_size": "ten"}, "'scheduler.params.step_size': got 'ten' (string); "
                                                  "expected an integer."),
    ("scheduler", "WarmupLR", {"warmup_type": 3}, "'scheduler.params.warmup_type': got 3 (integer); "
                                                  "expected a string."),
    ("scheduler", "LRRangeTest", {"lr_range_test_staircase": "no"},
     "'scheduler.params.lr_range_test_staircase': got 'no' (string); expected a boolean (true or false, or 0/1)."),
])
def test_wrong_kind_in_params_is_a_config_error(section, name, params, expected):
    from deepscale.runtime.lr_schedules import build_lr_scheduler
    from deepscale.runtime.optim.factory import build_optimizer
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError) as info:
        if section == "optimizer":
            build_optimizer(name, params, model.parameters())
        else:
            build_lr_scheduler(name, params, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(info.value) == f"Invalid value for config key {expected}"


def test_wrong_kind_in_params_through_initialize():
    import deepscale
    cfg = {**BATCH, "optimizer": {"type": "AdamW", "params": {"lr": "abc"}}}
    with pytest.raises(ValueError, match=r"'optimizer\.params\.lr': got 'abc' \(string\); expected a number"):
        deepscale.initialize(model=torch.nn.Linear(2, 2), config=cfg)


def test_right_kinds_pass_and_bool_params_take_0_and_1():
    from deepscale.runtime.optim.factory import build_optimizer
    opt = build_optimizer("AdamW", {"lr": 1, "betas": [0.9, 0.99], "amsgrad": 1, "eps": 1e-8},
                          torch.nn.Linear(2, 2).parameters())
    assert opt.param_groups[0]["amsgrad"] and opt.param_groups[0]["lr"] == 1


def test_check_call_kwargs_leaves_unknowable_arguments_to_the_target():
    def target(required, maybe=None, *, flag: bool = False):
        return required

    check_call_kwargs("x", {"required": "anything", "maybe": [1, "a"], "flag": 0}, target)
    with pytest.raises(ValueError, match="'x.flag': got 'on'"):
        check_call_kwargs("x", {"flag": "on"}, target)
