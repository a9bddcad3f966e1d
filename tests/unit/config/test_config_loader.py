"""Loading a config from a dict, a path, config_params or argparse args."""
import argparse
import json
import pathlib
import sys

import pytest

from deepscale.config import DeepScaleConfig, load_config_dict

BASIC = {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}}


def _write(tmp_path, text, name="ds_config.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dict_is_deep_copied():
    source = {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}}
    loaded = load_config_dict(config=source)
    loaded["fp16"]["enabled"] = False
    assert source["fp16"]["enabled"] is True


@pytest.mark.parametrize("as_pathlike", [False, True])
def test_path_as_str_or_pathlike(tmp_path, as_pathlike):
    path = _write(tmp_path, json.dumps(BASIC))
    assert load_config_dict(config=path if as_pathlike else str(path)) == BASIC


def test_config_params_dict():
    assert load_config_dict(config_params=BASIC) == BASIC


@pytest.mark.parametrize("attr", ["deepspeed_config", "deepscale_config"])
def test_args_attribute(tmp_path, attr):
    path = _write(tmp_path, json.dumps(BASIC))
    args = argparse.Namespace(**{attr: str(path)})
    assert load_config_dict(args=args) == BASIC


def test_args_with_both_attributes_naming_the_same_file(tmp_path):
    path = str(_write(tmp_path, json.dumps(BASIC)))
    args = argparse.Namespace(deepscale_config=path, deepspeed_config=path)
    assert load_config_dict(args=args) == BASIC


def test_args_with_two_different_files(tmp_path):
    first = str(_write(tmp_path, json.dumps(BASIC), "a.json"))
    second = str(_write(tmp_path, json.dumps(BASIC), "b.json"))
    args = argparse.Namespace(deepscale_config=first, deepspeed_config=second)
    with pytest.raises(ValueError, match="name different files"):
        load_config_dict(args=args)


def test_args_without_a_config_path_counts_as_no_source():
    with pytest.raises(ValueError, match="No DeepScale config was given") as info:
        load_config_dict(args=argparse.Namespace(deepspeed_config=None, local_rank=0))
    # The message says how to pass one.
    assert "config_params=<dict>" in str(info.value) and "args.deepscale_config" in str(info.value)


def test_no_source_at_all():
    with pytest.raises(ValueError, match="No DeepScale config was given"):
        load_config_dict()


@pytest.mark.parametrize("kwargs, names", [
    (dict(config=BASIC, config_params=BASIC), "config and config_params"),
    (dict(config=BASIC, args=argparse.Namespace(deepspeed_config="x.json")), "config and args.deepspeed_config"),
])
def test_two_sources(kwargs, names):
    with pytest.raises(ValueError, match=f"given twice \\({names}\\)"):
        load_config_dict(**kwargs)


def test_missing_file_shows_path(tmp_path):
    missing = tmp_path / "nope" / "ds.json"
    with pytest.raises(FileNotFoundError) as info:
        load_config_dict(config=str(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_config_dict(config=tmp_path)


def test_invalid_json_shows_line_and_column(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hjson", None)  # hjson would accept the trailing comma
    path = _write(tmp_path, '{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ValueError) as info:
        load_config_dict(config=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "line 3, column 28" in message
    # The offending line is quoted with a caret under the column.
    assert '"fp16": {"enabled": true,}' in message and "^" in message


def test_duplicate_key_in_file(tmp_path):
    path = _write(tmp_path, '{"train_batch_size": 8, "train_batch_size": 16}')
    with pytest.raises(ValueError, match="duplicate key 'train_batch_size'"):
        load_config_dict(config=path)


def test_json_file_must_hold_an_object(tmp_path):
    path = _write(tmp_path, "[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_config_dict(config=path)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(config=42), "config must be a dict or a path"),
    (dict(config_params="ds.json"), "config_params must be a dict"),
    (dict(args=argparse.Namespace(deepscale_config={"a": 1})), "args.deepscale_config must be a path"),
])
def test_wrong_source_types(kwargs, expected):
    with pytest.raises(TypeError, match=expected):
        load_config_dict(**kwargs)


def test_from_source_records_the_file_and_validates(tmp_path):
    path = _write(tmp_path, json.dumps({"train_batch_size": 16, "gradient_accumulation_steps": 2}))
    cfg = DeepScaleConfig.from_source(args=argparse.Namespace(deepscale_config=str(path)), dp_world_size=4)
    assert cfg.source == str(path)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (16, 2, 2)
    assert DeepScaleConfig.from_source(config_params=BASIC).source == "dict"


def test_from_source_with_pathlib_path(tmp_path):
    path = _write(tmp_path, json.dumps(BASIC))
    cfg = DeepScaleConfig.from_source(config=pathlib.Path(path))
    assert cfg.fp16_enabled and cfg.train_micro_batch_size_per_gpu == 2
