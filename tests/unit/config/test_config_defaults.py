"""DeepSpeed defaults, a realistic full config, precision checks, summaries and the docs."""
import pathlib
import sys

import pytest

from deepscale.config import DeepScaleConfig
from deepscale.config.reference import BEGIN_MARKER, END_MARKER, iter_config_keys, render_markdown

DOCS = pathlib.Path(__file__).resolve().parents[3] / "docs" / "config.md"

# DeepSpeed's defaults for the keys the engine reads.
DEEPSPEED_DEFAULTS = {
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
    "memory_breakdown": False,
    "dump_state": False,
    "gradient_clipping": 1.0,  # deepspeed/runtime/constants.py GRADIENT_CLIPPING_DEFAULT in 0.19.8
    "prescale_gradients": False,
    "gradient_predivide_factor": 1.0,
    "sparse_gradients": False,
    "communication_data_type": None,
    "dataloader_drop_last": False,
    "zero_allow_untested_optimizer": False,
    "zero_force_ds_cpu_optimizer": True,
    "optimizer": None,
    "scheduler": None,
    "fp16.enabled": False,
    "fp16.auto_cast": False,
    "fp16.loss_scale": 0,
    "fp16.initial_scale_power": 16,
    "fp16.loss_scale_window": 1000,
    "fp16.hysteresis": 2,
    "fp16.consecutive_hysteresis": False,
    "fp16.min_loss_scale": 1,
    "fp16.fp16_master_weights_and_grads": False,
    "fp16.raise_error_at_min_scale": False,
    "bf16.enabled": False,
    "bf16.immediate_grad_update": False,
    "bf16.check_grad_overflow": False,
    "data_types.grad_accum_dtype": None,
    "zero_optimization.stage": 0,
    "zero_optimization.contiguous_gradients": True,
    "zero_optimization.reduce_scatter": True,
    "zero_optimization.reduce_bucket_size": 500_000_000,
    "zero_optimization.allgather_partitions": True,
    "zero_optimization.allgather_bucket_size": 500_000_000,
    "zero_optimization.overlap_comm": False,
    "zero_optimization.load_from_fp32_weights": True,
    "zero_optimization.offload_param": None,
    "zero_optimization.offload_optimizer": None,
    "zero_optimization.sub_group_size": 1_000_000_000,
    "zero_optimization.prefetch_bucket_size": 50_000_000,
    "zero_optimization.param_persistence_threshold": 100_000,
    "zero_optimization.model_persistence_threshold": sys.maxsize,
    "zero_optimization.max_live_parameters": 1_000_000_000,
    "zero_optimization.max_reuse_distance": 1_000_000_000,
    "zero_optimization.gather_16bit_weights_on_model_save": False,
    "zero_optimization.ignore_unused_parameters": True,
    "zero_optimization.round_robin_gradients": False,
    "checkpoint.tag_validation": "WARN",
    "checkpoint.load_universal": False,
    "checkpoint.use_node_local_storage": False,
    "checkpoint.parallel_write.pipeline_stage": False,
    "aio.block_size": 1_048_576,
    "aio.queue_depth": 8,
    "aio.intra_op_parallelism": 1,
    "aio.single_submit": False,
    "aio.overlap_events": True,
    "activation_checkpointing.partition_activations": False,
    "activation_checkpointing.number_checkpoints": None,
    "pipeline.stages": "auto",
    "pipeline.partition": "best",
    "pipeline.activation_checkpoint_interval": 0,
    "tensorboard.job_name": "DeepSpeedJobName",
    "wandb.project": "deepspeed",
    "flops_profiler.profile_step": 1,
    "flops_profiler.module_depth": -1,
    "flops_profiler.top_modules": 1,
    "comms_logger.prof_all": True,
    "progressive_layer_drop.theta": 1.0,
    "progressive_layer_drop.gamma": 0.001,
    "eigenvalue.max_iter": 100,
    "eigenvalue.layer_name": "bert.encoder.layer",
}


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture(scope="module")
def default_cfg():
    return DeepScaleConfig.from_dict({"train_micro_batch_size_per_gpu": 1})


@pytest.mark.parametrize("key", sorted(DEEPSPEED_DEFAULTS))
def test_defaults_match_deepspeed(default_cfg, key):
    value = _get(default_cfg, key)
    assert value == DEEPSPEED_DEFAULTS[key]
    assert type(value) is not bool or isinstance(DEEPSPEED_DEFAULTS[key], bool)


def test_convenience_properties_on_defaults(default_cfg):
    assert (default_cfg.fp16_enabled, default_cfg.bf16_enabled) == (False, False)
    assert default_cfg.zero_stage == 0 and not default_cfg.zero_enabled
    assert default_cfg.loss_scale_is_dynamic is False  # no fp16, no loss scaling
    assert default_cfg.dp_world_size == 1


FULL_DEEPSPEED_CONFIG = {
    "train_batch_size": 256,
    "gradient_accumulation_steps": 4,
    "steps_per_print": 50,
    "wall_clock_breakdown": False,
    "memory_breakdown": False,
    "gradient_clipping": 0.5,
    "prescale_gradients": False,
    "gradient_predivide_factor": 1.0,
    "zero_allow_untested_optimizer": True,
    "communication_data_type": "fp32",
    "dataloader_drop_last": True,
    "fp16": {"enabled": True, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 12,
             "loss_scale_window": 500, "hysteresis": 2, "consecutive_hysteresis": False, "min_loss_scale": 1},
    "bf16": {"enabled": False},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                              "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                                                      "warmup_num_steps": 200, "total_num_steps": 5000}},
    "zero_optimization": {"stage": 0, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                          "contiguous_gradients": True, "round_robin_gradients": False,
                          "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True,
                          "offload_optimizer": {"device": "none", "pin_memory": True},
                          "offload_param": {"device": "none"}},
    "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False,
                                 "contiguous_memory_optimization": False, "number_checkpoints": None,
                                 "synchronize_checkpoint_boundary": False, "profile": False},
    "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
            "overlap_events": True},
    "flops_profiler": {"enabled": False, "profile_step": 1, "module_depth": -1, "top_modules": 1,
                       "detailed": True, "output_file": None},
    "tensorboard": {"enabled": False, "output_path": "logs/", "job_name": "gpt"},
    "wandb": {"enabled": False, "team": None, "group": None, "project": "gpt"},
    "csv_monitor": {"enabled": False, "output_path": "logs/", "job_name": "gpt"},
    "comms_logger": {"enabled": False, "verbose": False, "prof_all": True, "debug": False},
    "checkpoint": {"tag_validation": "Warn", "load_universal": False, "use_node_local_storage": False,
                   "parallel_write": {"pipeline_stage": False}},
    "data_types": {"grad_accum_dtype": "fp32"},
    "elasticity": {"enabled": False, "max_train_batch_size": 2000, "micro_batch_sizes": [2, 4, 6]},
    "autotuning": {"enabled": False, "fast": True},
    "pipeline": {"stages": "auto", "partition": "parameters", "activation_checkpoint_interval": 0},
    "progressive_layer_drop": {"enabled": False, "theta": 0.5, "gamma": 0.001},
    "eigenvalue": {"enabled": False, "verbose": False, "max_iter": 100, "tol": 1e-2, "stability": 1e-6},
    "sparse_gradients": False,
}


def test_realistic_full_deepspeed_config_parses():
    cfg = DeepScaleConfig.from_dict(FULL_DEEPSPEED_CONFIG, dp_world_size=8)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (256, 8, 4)
    assert cfg.fp16_enabled and cfg.loss_scale_is_dynamic and cfg.fp16.initial_dynamic_scale == 2.0 ** 12
    assert cfg.optimizer.type == "AdamW" and cfg.optimizer.params["betas"] == [0.9, 0.95]
    assert cfg.scheduler.type == "WarmupDecayLR" and cfg.scheduler.params["total_num_steps"] == 5000
    assert cfg.zero_stage == 0 and cfg.zero_optimization.reduce_bucket_size == 200_000_000
    assert cfg.zero_optimization.gather_16bit_weights_on_model_save is True
    assert cfg.checkpoint.tag_validation == "WARN"
    assert cfg.raw == FULL_DEEPSPEED_CONFIG
    # Tuning keys for unbuilt features are reported, the gradient reducer's bucket size is not.
    assert "aio.block_size" in cfg.ignored_keys and "zero_optimization.overlap_comm" in cfg.ignored_keys
    assert "zero_optimization.reduce_bucket_size" not in cfg.ignored_keys


def test_fp16_and_bf16_together_names_both_keys():
    for bf16_key in ("bf16", "bfloat16"):
        with pytest.raises(ValueError) as info:
            DeepScaleConfig.from_dict({"train_batch_size": 8, "fp16": {"enabled": True},
                                       bf16_key: {"enabled": True}})
        assert str(info.value) == (f"fp16.enabled and {bf16_key}.enabled are both true; enable at most one of "
                                   "fp16 and bf16")


def test_static_loss_scale():
    cfg = DeepScaleConfig.from_dict({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": 128}})
    assert not cfg.loss_scale_is_dynamic and not cfg.fp16.dynamic_loss_scale and cfg.fp16.loss_scale == 128.0


def test_raise_error_at_min_scale_extension():
    cfg = DeepScaleConfig.from_dict({"train_batch_size": 8,
                                     "fp16": {"enabled": True, "raise_error_at_min_scale": True}})
    assert cfg.fp16.raise_error_at_min_scale is True


def test_bf16_properties():
    cfg = DeepScaleConfig.from_dict({"train_batch_size": 8, "bf16": {"enabled": True}})
    assert cfg.bf16_enabled and not cfg.fp16_enabled and not cfg.loss_scale_is_dynamic


def test_repr_and_describe_are_readable():
    cfg = DeepScaleConfig.from_dict(FULL_DEEPSPEED_CONFIG, dp_world_size=8)
    assert repr(cfg) == ("DeepScaleConfig(train_batch_size=256, train_micro_batch_size_per_gpu=8, "
                         "gradient_accumulation_steps=4, dp_world_size=8, precision=fp16 (dynamic loss scale), "
                         "zero_stage=0, optimizer=AdamW, scheduler=WarmupDecayLR)")
    text = cfg.describe()
    assert "train_batch_size=256 = micro batch 8 x accumulation 4 x data-parallel 8" in text
    assert "gradient_clipping = 0.5" in text and "fp16.initial_scale_power = 12" in text
    assert "accepted but without effect yet: " in text


def test_docs_tables_match_the_code():
    document = DOCS.read_text(encoding="utf-8")
    generated = document[document.index(BEGIN_MARKER) + len(BEGIN_MARKER):document.index(END_MARKER)]
    assert generated.strip() == render_markdown(DeepScaleConfig).strip(), (
        "docs/config.md is out of date; run: python -m deepscale.config.reference --write docs/config.md")


def test_docs_list_every_key():
    document = DOCS.read_text(encoding="utf-8")
    missing = [info.path for info in iter_config_keys(DeepScaleConfig)
               if not info.is_section and f"`{info.path}`" not in document]
    assert missing == []


def test_config_package_imports_only_logging_from_deepscale():
    # DESIGN: config depends on nothing else in deepscale.
    import ast
    package = pathlib.Path(__file__).resolve().parents[3] / "deepscale" / "config"
    offenders = []
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("deepscale") and not name.startswith(("deepscale.config",
                                                                         "deepscale.utils.logging")):
                    offenders.append(f"{source.name}: {name}")
    assert offenders == []
