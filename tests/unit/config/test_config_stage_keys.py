"""ZeRO keys warn at every stage that ignores them; stage 3 refuses what it cannot honour; the
docs' availability statements are computed from the same tables."""
import pytest

from deepscale.config import DeepScaleConfig, FeatureNotAvailableError, features
from deepscale.config.reference import key_status, render_availability

ZERO_PLUS_PLUS = {"zero_quantized_weights": True, "zero_quantized_nontrainable_weights": True,
                  "zero_quantized_gradients": True, "zero_hpz_partition_size": 8, "mics_shard_size": 4,
                  "mics_hierarchical_params_gather": True, "zeropp_loco_param": {"err_beta": 0.8}}


def _ignored(stage, **zero):
    cfg = DeepScaleConfig.from_dict({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage,
                                                                                                  **zero}})
    return cfg.ignored_keys


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_plus_plus_and_mics_keys_warn_at_every_stage(stage):
    assert _ignored(stage, **ZERO_PLUS_PLUS) == [f"zero_optimization.{k}" for k in ZERO_PLUS_PLUS]


@pytest.mark.parametrize("stage, ignored", [(1, True), (2, True), (3, False)])
def test_stage3_keys_warn_below_stage_3_in_either_spelling(stage, ignored):
    keys = {"stage3_prefetch_bucket_size": 10, "max_live_parameters": 10, "stage3_max_reuse_distance": 10,
            "stage3_param_persistence_threshold": 10, "stage3_gather_16bit_weights_on_model_save": True}
    assert _ignored(stage, **keys) == ([f"zero_optimization.{k}" for k in keys] if ignored else [])


@pytest.mark.parametrize("stage, ignored", [(1, False), (2, False), (3, True)])
def test_stage_1_2_keys_warn_at_stage_3(stage, ignored):
    keys = {"allgather_bucket_size": 10, "allgather_partitions": True, "reduce_scatter": True, "overlap_comm": True}
    assert _ignored(stage, **keys) == ([f"zero_optimization.{k}" for k in keys] if ignored else [])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_keys_every_stage_uses_do_not_warn(stage):
    assert _ignored(stage, reduce_bucket_size=100, contiguous_gradients=True, ignore_unused_parameters=True) == []


def test_each_ignored_key_is_logged_once_even_when_two_rules_cover_it():
    assert _ignored(0, zero_quantized_weights=True) == ["zero_optimization.zero_quantized_weights"]


@pytest.mark.parametrize("sections, key", [
    ({"prescale_gradients": True}, "prescale_gradients=true at zero_optimization.stage 3"),
    ({"zero_optimization": {"stage": 3, "ignore_unused_parameters": False}},
     "zero_optimization.ignore_unused_parameters=false at zero_optimization.stage 3"),
])
def test_stage3_refuses_what_it_does_not_do(sections, key):
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, **sections}
    with pytest.raises(FeatureNotAvailableError) as info:
        DeepScaleConfig.from_dict(config)
    assert str(info.value).startswith(key + " requires ")
    for stage in (1, 2):  # the same settings are honoured below stage 3
        config["zero_optimization"]["stage"] = stage
        DeepScaleConfig.from_dict(config)


def test_doc_statuses_follow_the_tables(monkeypatch):
    assert key_status("zero_optimization.stage") == "0, 1, 2 and 3 supported"
    assert key_status("zero_optimization.zero_quantized_weights") == "accepted, warns: no effect yet"
    assert key_status("zero_optimization.prefetch_bucket_size") == (
        "supported at ZeRO stage 3; at stages 0-2 accepted, warns: no effect")
    assert key_status("prescale_gradients") == (
        "supported; true at zero_optimization.stage 3 raises FeatureNotAvailableError")
    assert "| `zero_optimization.stage` |" not in render_availability()
    # Un-building a stage changes the docs with no other edit.
    monkeypatch.setattr(features, "AVAILABLE_ZERO_STAGES", {0, 1, 2})
    assert key_status("zero_optimization.stage") == "0, 1 and 2 supported; 3 raises FeatureNotAvailableError"
    assert "| `zero_optimization.stage` | ZeRO stage 3 | use stage 0, 1 or 2 |" in render_availability()


def test_doc_statuses_follow_the_no_effect_table(monkeypatch):
    monkeypatch.setattr(features, "TUNING_ONLY_KEYS", [r for r in features.TUNING_ONLY_KEYS
                                                       if r not in features.ZERO_KEYS_IGNORED])
    assert key_status("zero_optimization.zero_quantized_weights") == (
        "supported at ZeRO stages 1-3; at stage 0 accepted, warns: no effect")


def test_every_extension_key_is_described_in_the_docs():
    import pathlib
    from deepscale.config.config import DeepScaleConfig as Top
    from deepscale.config.errors import nested_model
    from deepscale.config.reference import EXTENSION_KEYS
    document = (pathlib.Path(__file__).resolve().parents[3] / "docs" / "config.md").read_text(encoding="utf-8")
    section = document[document.index("## deepscale extensions"):document.index("## Status of each key")]
    for path in EXTENSION_KEYS:
        *parents, name = path.split(".")
        model = Top
        for part in parents:
            model = nested_model(model.model_fields[part].annotation)
        spelled = ".".join(parents + [model.model_fields[name].alias or name])
        assert f"`{spelled}`" in section, path
