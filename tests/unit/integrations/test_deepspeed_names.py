"""Names and behaviours DeepSpeed clients (HF Trainer/Accelerate, the CIFAR tutorial) call on deepscale."""
import contextlib
import importlib.machinery
import sys
import types

import pytest
import torch

import deepscale
from dist_harness import run_distributed
from engine_test_models import base_config, global_batch, make_model


# --- deepscale.moe.utils -------------------------------------------------------------------
def test_moe_utils_leave_a_model_without_experts_unchanged():
    from deepscale.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
    model = make_model()
    assert not any(is_moe_param(p) for p in model.parameters())
    group = {"params": list(model.parameters()), "name": "parameters", "lr": 0.1}
    groups = split_params_into_different_moe_groups_for_optimizer(group, max_group_size=1000)
    assert len(groups) == 1 and groups[0]["params"] == list(model.parameters()) and groups[0]["lr"] == 0.1
    torch.optim.AdamW(groups)  # still a valid optimizer input


def test_moe_utils_split_expert_params_by_group_and_size():
    from deepscale.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
    dense = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    experts = [torch.nn.Parameter(torch.zeros(6)) for _ in range(3)]
    for param in experts:
        param.allreduce, param.group_name = False, "ep_size_2"
    assert [is_moe_param(p) for p in dense + experts] == [False, False, True, True, True]
    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"params": dense + experts, "name": "g", "weight_decay": 0.1}], max_group_size=12)
    assert groups[0]["params"] == dense and "moe" not in groups[0]
    moe = groups[1:]
    assert [len(g["params"]) for g in moe] == [2, 1]  # 6+6 fits in 12, the third starts a new group
    assert all(g["moe"] and g["name"] == "g_ep_size_2" and g["weight_decay"] == 0.1 for g in moe)
    with pytest.raises(TypeError, match="param_groups"):
        split_params_into_different_moe_groups_for_optimizer([torch.zeros(1)])


# --- deepscale.checkpoint.utils --------------------------------------------------------------
def test_clone_tensors_for_torch_save_gives_each_tensor_its_own_storage():
    from deepscale.checkpoint.utils import clone_tensors_for_torch_save
    flat = torch.arange(10.0)
    state = {"a": flat[:3], "nested": [flat[3:5], (flat[5:], 7)], "name": "x"}
    copied = clone_tensors_for_torch_save(state)
    assert copied["a"].untyped_storage().nbytes() == 3 * 4
    assert torch.equal(copied["nested"][0], flat[3:5]) and isinstance(copied["nested"][1], tuple)
    assert copied["nested"][1][1] == 7 and copied["name"] == "x"
    copied["a"].add_(1)
    assert flat[0] == 0  # a copy, not a view
    module_sd = make_model().state_dict()
    assert clone_tensors_for_torch_save(module_sd)._metadata == module_sd._metadata


# --- deepscale.utils.groups ------------------------------------------------------------------
def _groups_body():
    import torch.distributed as tdist
    from deepscale.utils import groups
    deepscale.init_distributed(verbose=False)
    out = (groups._get_data_parallel_world_size(), groups._get_data_parallel_rank(),
           groups._get_data_parallel_group() is tdist.group.WORLD, groups._get_model_parallel_world_size(),
           groups._get_sequence_parallel_world_size(), groups._get_broadcast_src_rank())
    try:
        groups._get_sequence_parallel_group()
        sp_error = None
    except ValueError as err:
        sp_error = str(err)
    return out, sp_error


def test_groups_accessors_without_mpu():
    results = run_distributed(_groups_body, 2)
    assert [r[0] for r in results] == [(2, 0, True, 1, 1, 0), (2, 1, True, 1, 1, 0)]
    assert all("sequence parallelism is not configured" in r[1] for r in results)


def test_groups_accessors_follow_a_registered_mpu(monkeypatch):
    from deepscale.utils import groups

    class Mpu:
        def get_data_parallel_world_size(self):
            return 3

        def get_data_parallel_rank(self):
            return 2

        def get_model_parallel_world_size(self):
            return 4

    monkeypatch.setattr(groups, "mpu", Mpu())
    assert groups._get_data_parallel_world_size() == 3 and groups._get_data_parallel_rank() == 2
    assert groups._get_model_parallel_world_size() == 4 and groups._get_model_parallel_rank() == 0


# --- config and engine -----------------------------------------------------------------------
def test_steps_per_print_infinity_means_never():
    from deepscale.config import DeepScaleConfig
    assert DeepScaleConfig.from_dict({"train_batch_size": 2, "steps_per_print": float("inf")}).steps_per_print is None
    with pytest.raises(ValueError, match="steps_per_print"):
        DeepScaleConfig.from_dict({"train_batch_size": 2, "steps_per_print": float("-inf")})


def test_deepspeed_config_class_builds_the_validated_config(tmp_path):
    from deepscale.runtime.config import DeepSpeedConfig
    cfg = DeepSpeedConfig({"train_batch_size": 8, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1}})
    assert isinstance(cfg, deepscale.DeepScaleConfig) and deepscale.DeepSpeedConfig is DeepSpeedConfig
    assert (cfg.train_micro_batch_size_per_gpu, cfg.zero_stage) == (4, 1)
    assert cfg.raw["zero_optimization"] == {"stage": 1}
    with pytest.raises(ValueError, match="train_batch_sizee"):
        DeepSpeedConfig({"train_batch_sizee": 8})


def test_engine_compat_surface():
    cfg = base_config(2, 2, 1, zero_optimization={"stage": 2}, steps_per_print=float("inf"))
    engine, *_ = deepscale.initialize(model=make_model(), config=cfg)
    try:
        assert isinstance(engine, deepscale.DeepSpeedEngine) and deepscale.DeepSpeedEngine is deepscale.DeepScaleEngine
        assert isinstance(engine.config, dict)
        assert engine.config.get("zero_optimization", {}).get("stage") == 2  # what the HF Trainer reads
        assert engine._config.zero_stage == 2
        assert engine.zero_optimization() and engine.zero_optimization_partition_gradients()
        assert not engine.zero_optimization_partition_weights() and not engine.zero_gather_16bit_weights_on_model_save()
        assert engine.get_data_parallel_world_size() == 1 and engine.get_data_parallel_rank() == 0
        assert not engine.zero_offload_optimizer() and not engine.zero_offload_param()
        assert engine.data_parallel_group is engine.dp_group
        assert not engine.was_step_applied()
        applied = []
        for micro in range(4):
            x, y = global_batch(micro, 2)
            engine.backward(engine(x, y))
            engine.step()
            applied.append(engine.was_step_applied())
        assert applied == [False, True, False, True]  # only the accumulation boundary updates
    finally:
        engine.destroy()


# --- zero.Init with Hugging Face's arguments -------------------------------------------------
class _Rotary(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 4, 2, dtype=torch.int64).float() / 4)))
        self.register_buffer("table", torch.ones(3))


def _init_body():
    deepscale.init_distributed(verbose=False)
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    with deepscale.zero.Init(config_dict_or_path=config):
        module = _Rotary()
        explicit = torch.zeros(2, dtype=torch.float32)
    after = torch.ones(2)
    return (module.proj.weight.dtype, module.table.dtype, explicit.dtype, after.dtype, hasattr(module.proj.weight,
            "ds_id"), tuple(module.proj.weight.ds_shape))


def test_zero_init_creates_floating_tensors_in_the_config_dtype():
    for result in run_distributed(_init_body, 2):
        assert result == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, True, (4, 4))


def test_zero_init_honours_transformers_prevent_arange_dtype_change():
    pytest.importorskip("transformers")
    # Without the guard the arange-derived rotary buffer is made in bf16; with it, HF's replacement wrapper keeps
    # arange out of the cast, which only works if Init looks the wrapper up by name as DeepSpeed does.
    assert run_distributed(_init_arange_body, 2, args=(False,)) == [torch.bfloat16] * 2
    assert run_distributed(_init_arange_body, 2, args=(True,)) == [torch.float32] * 2


@contextlib.contextmanager
def _deepspeed_alias_in_process():
    """What the installed shim does, in this process only: ``import deepspeed`` -> deepscale."""
    from deepscale.compat.deepspeed_alias import DeepSpeedAliasFinder, install_alias
    saved_meta_path, saved = list(sys.meta_path), sys.modules.get("deepspeed")
    package = types.ModuleType("deepspeed")
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None, is_package=True)
    install_alias(vars(package), "0.19.8+deepscale")
    sys.modules["deepspeed"] = package
    try:
        yield package
    finally:
        sys.meta_path[:] = [f for f in saved_meta_path if not isinstance(f, DeepSpeedAliasFinder)]
        for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
            del sys.modules[name]
        if saved is not None:
            sys.modules["deepspeed"] = saved


def _init_arange_body(prevent_arange):
    deepscale.init_distributed(verbose=False)
    with _deepspeed_alias_in_process():
        guard = contextlib.nullcontext()
        if prevent_arange:
            from transformers.integrations.deepspeed import prevent_arange_dtype_change
            guard = prevent_arange_dtype_change()
        with guard, deepscale.zero.Init(dtype=torch.bfloat16):
            positions = torch.arange(0.0, 4.0)
    return positions.dtype


def test_zero_init_ignores_unfilled_auto_precision():
    from deepscale.runtime.zero.partition_parameters import _config_dtype
    assert _config_dtype({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}) is None
    assert _config_dtype({"fp16": {"enabled": True}}) == torch.float16


def test_runtime_and_utils_submodules_resolve_as_attributes():
    import deepscale.runtime
    import deepscale.utils
    assert "WarmupLR" in deepscale.runtime.lr_schedules.VALID_LR_SCHEDULES
    assert callable(deepscale.utils.groups._get_data_parallel_world_size)
    from deepscale.runtime.zero import GatheredParameters, Init  # DeepSpeed's deepspeed.runtime.zero path
    assert GatheredParameters is deepscale.zero.GatheredParameters and Init is deepscale.zero.Init
    with pytest.raises(AttributeError):
        deepscale.runtime.no_such_module  # noqa: B018


# --- checkpoint tag handling ------------------------------------------------------------------
def _tag_body(mode, tmp):
    import torch.distributed as tdist
    from deepscale.runtime.checkpoint.tag_validation import validate_checkpoint_tag
    engine, *_ = deepscale.initialize(model=make_model(), config=base_config(
        2, 1, 2, checkpoint={"tag_validation": mode}))
    try:
        same = validate_checkpoint_tag("global_step0", mode)
        try:
            engine.save_checkpoint(tmp, tag=f"rank{tdist.get_rank()}")
            outcome = "saved"
        except ValueError as err:
            outcome = str(err)
        return same, outcome
    finally:
        engine.destroy()


def test_checkpoint_tag_validation_fail_mode_refuses_rank_dependent_tags(tmp_path):
    results = run_distributed(_tag_body, 2, args=("Fail", str(tmp_path)))
    for same, outcome in results:
        assert same is True
        assert "ranks passed different tags" in outcome and "'rank0' on ranks [0]" in outcome
    assert not list(tmp_path.iterdir())  # nothing written


def test_checkpoint_tag_validation_ignore_mode_skips_the_check(tmp_path):
    from deepscale.runtime.checkpoint.tag_validation import validate_checkpoint_tag
    assert validate_checkpoint_tag("anything", "ignore")
    with pytest.raises(ValueError, match="tag_validation"):
        validate_checkpoint_tag("x", "LOUD")


@pytest.mark.parametrize("stage", [0, 2])
def test_cifar_tutorial_param_groups_train(stage):
    # The getting-started CIFAR tutorial passes the output of the MoE splitter as model_parameters.
    from deepscale.moe.utils import split_params_into_different_moe_groups_for_optimizer
    model = make_model()
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
    engine, optimizer, *_ = deepscale.initialize(model=model, model_parameters=groups,
                                                 config=base_config(2, 1, 1, zero_optimization={"stage": stage}))
    try:
        x, y = global_batch(0, 2)
        before = [p.detach().clone() for p in model.parameters()]
        engine.backward(engine(x, y))
        engine.step()
        assert engine.was_step_applied()
        assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    finally:
        engine.destroy()


def test_engine_optimizer_passes_deepspeed_optimizer_type_checks():
    # Lightning Fabric: isinstance(opt, (torch.optim.Optimizer, DeepSpeedOptimizer)) before a load.
    from deepscale.runtime.base_optimizer import DeepSpeedOptimizer
    cfg = base_config(2, 1, 1, bf16={"enabled": True})
    engine, optimizer, _, _ = deepscale.initialize(model=make_model(), config=cfg)
    try:
        assert isinstance(optimizer, DeepSpeedOptimizer) and not isinstance(optimizer, torch.optim.Optimizer)
    finally:
        engine.destroy()
