"""The config's optimizer uses deepscale's compiled optimizers where they apply, torch's otherwise.

fp32 tolerance between the compiled CPU Adam and torch's AdamW after a few steps: 2e-6
(absolute and relative): the kernels compute the same formula in another order (FMA, a
reciprocal square root), so they differ in the last bits of each step.
"""
import logging

import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import base_config, make_model, train_steps
from deepscale.ops.adagrad import DeepScaleCPUAdagrad
from deepscale.ops.adam import DeepScaleCPUAdam
from deepscale.ops.lion import DeepScaleCPULion
from deepscale.ops.op_loader import load_op, reset_op_cache
from deepscale.runtime.optim import Lion, build_optimizer, compiled
from deepscale.utils.logging import logger

FP32_TOL = 2e-6
MICRO_BS = 2
WORLD = 2


def _require_ops(*names):
    missing = [name for name in names if load_op(name) is None]
    if missing:
        pytest.skip(f"op(s) {', '.join(missing)} cannot be built here (see the warning)")


def _params():
    torch.manual_seed(0)
    return list(torch.nn.Linear(3, 2).parameters())


@pytest.fixture
def log_lines(monkeypatch):
    """Messages the deepscale logger emits during the test (it does not propagate to caplog)."""
    lines = []

    class _Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = _Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    monkeypatch.setattr(compiled, "_logged", set())
    yield lines
    logger.removeHandler(handler)


@pytest.mark.parametrize("name, params, cls, checks", [
    ("adam", {}, DeepScaleCPUAdam, {"adam_w_mode": True}),
    ("Adam", {"adam_w_mode": False}, DeepScaleCPUAdam, {"adam_w_mode": False}),
    ("ADAMW", {"adam_w_mode": False}, DeepScaleCPUAdam, {"adam_w_mode": True}),  # adamw always decouples
    ("Adagrad", {"lr": 0.1}, DeepScaleCPUAdagrad, {}),
    ("lion", {}, DeepScaleCPULion, {}),
])
def test_cpu_parameters_get_the_compiled_optimizer(name, params, cls, checks, log_lines):
    _require_ops("cpu_adam", "cpu_adagrad", "cpu_lion")
    opt = build_optimizer(name, params, _params())
    assert type(opt) is cls and opt.uses_compiled_op
    for attr, value in checks.items():
        assert getattr(opt, attr) == value
    assert any(f"optimizer '{name}': deepscale {cls.__name__}, compiled op" in line and "parameters on cpu" in line
               for line in log_lines)


def test_compiled_optimizers_take_torch_defaults():
    _require_ops("cpu_lion", "cpu_adam")
    lion = build_optimizer("lion", {}, _params())
    reference = Lion(_params())
    assert lion.defaults["lr"] == reference.defaults["lr"] and lion.defaults["betas"] == reference.defaults["betas"]
    adam = build_optimizer("adam", {"lr": 0.5, "betas": [0.8, 0.9]}, _params())
    assert (adam.defaults["lr"], adam.defaults["betas"], adam.defaults["eps"]) == (0.5, (0.8, 0.9), 1e-8)
    assert adam.defaults["weight_decay"] == 0.0  # DeepSpeed's FusedAdam default


@pytest.mark.parametrize("name, params, cls, reason", [
    ("adam", {"torch_adam": True}, torch.optim.AdamW, None),
    ("adam", {"amsgrad": True}, torch.optim.AdamW, "optimizer.params.amsgrad=True asks for torch's implementation"),
    ("adamw", {"foreach": True}, torch.optim.AdamW, "optimizer.params.foreach=True"),
    ("adagrad", {"lr_decay": 0.1}, torch.optim.Adagrad, "optimizer.params.lr_decay=0.1"),
    ("lion", {"foreach": False}, Lion, "optimizer.params.foreach=False"),
])
def test_torch_only_options_keep_torch(name, params, cls, reason, log_lines):
    opt = build_optimizer(name, params, _params())
    assert type(opt) is cls
    if reason:
        assert any(reason in line for line in log_lines), log_lines


def test_torch_only_option_in_a_param_group_keeps_torch():
    params = _params()
    opt = build_optimizer("adamw", {}, [{"params": params[:1]}, {"params": params[1:], "amsgrad": True}])
    assert type(opt) is torch.optim.AdamW


def test_parameters_off_cpu_keep_torch(log_lines):
    params = list(torch.nn.Linear(3, 2, device="meta").parameters())
    assert type(build_optimizer("lion", {}, params)) is Lion
    assert any("optimizer 'lion': deepscale.runtime.optim.lion.Lion (no compiled lion optimizer for parameters on "
               "meta)" in line for line in log_lines)


@pytest.fixture
def ops_disabled(monkeypatch):
    """The CPU optimizer ops fail to load, as on a machine without a compiler."""
    monkeypatch.setenv("DEEPSCALE_DISABLE_OPS", "cpu_adam,cpu_lion")
    reset_op_cache()
    yield
    monkeypatch.delenv("DEEPSCALE_DISABLE_OPS")
    reset_op_cache()


def test_op_that_cannot_build_falls_back_to_torch_with_one_warning(ops_disabled, log_lines):
    opt = build_optimizer("adamw", {"lr": 0.1}, _params())
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.0
    build_optimizer("adamw", {"lr": 0.1}, _params())
    warnings = [line for line in log_lines if line.startswith("op '")]
    assert warnings == ["op 'cpu_adam' is not available (disabled by DEEPSCALE_DISABLE_OPS); using "
                        "torch.optim.AdamW for optimizer 'adamw'"]
    choice = [line for line in log_lines if "optimizer 'adamw':" in line]
    assert len(choice) == 1  # logged once
    assert choice[0].endswith("optimizer 'adamw': torch.optim.AdamW (op 'cpu_adam' could not be loaded, see its "
                              "warning)")
    assert type(build_optimizer("lion", {}, _params())) is Lion


# --- through the engine ---------------------------------------------------------------------
def _config(stage, torch_adam=False):
    params = {"lr": 1e-2, "weight_decay": 0.01, "betas": [0.9, 0.99]}
    if torch_adam:
        params["torch_adam"] = True
    return base_config(MICRO_BS, 1, WORLD, optimizer={"type": "AdamW", "params": params},
                       zero_optimization={"stage": stage})


def _engine(stage, torch_adam=False, seed=1234):
    import deepscale
    return deepscale.initialize(model=make_model(seed=seed), config=_config(stage, torch_adam))[0]


def _train(engine, steps):
    return train_steps(engine, steps, MICRO_BS, WORLD)


def _full_params(engine):
    from deepscale.runtime.zero.partition_parameters import GatheredParameters
    with GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _engine_runs(stage, ckpt_dir):
    """Compiled vs torch AdamW over 6 steps; then a compiled save at step 3 resumed both ways."""
    compiled_engine = _engine(stage)
    basic = compiled_engine.basic_optimizer
    kind = type(basic).__name__
    compiled_losses = _train(compiled_engine, range(6))
    state = next(iter(basic.state.values()))
    state_keys = sorted(state)
    step_value = (type(state["step"]).__name__, float(state["step"]))
    compiled_params = _full_params(compiled_engine)
    compiled_engine.destroy()

    torch_engine = _engine(stage, torch_adam=True)
    torch_kind = type(torch_engine.basic_optimizer).__name__
    torch_losses = _train(torch_engine, range(6))
    torch_params = _full_params(torch_engine)
    torch_engine.destroy()

    first = _engine(stage)
    _train(first, range(3))
    first.save_checkpoint(ckpt_dir, tag="step3")
    first.destroy()
    resumed = {}
    for name, torch_adam in (("compiled", False), ("torch", True)):
        engine = _engine(stage, torch_adam=torch_adam, seed=99)
        engine.load_checkpoint(ckpt_dir, tag="step3")
        resumed[name] = _train(engine, range(3, 6))
        engine.destroy()
    return dict(kind=kind, torch_kind=torch_kind, compiled_losses=compiled_losses, torch_losses=torch_losses,
                compiled_params=compiled_params, torch_params=torch_params, state_keys=state_keys,
                step_value=step_value, resumed=resumed)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_trains_and_resumes_with_the_compiled_optimizer(tmp_path, stage):
    _require_ops("cpu_adam")
    for out in run_distributed(_engine_runs, WORLD, args=(stage, str(tmp_path))):
        assert (out["kind"], out["torch_kind"]) == ("DeepScaleCPUAdam", "AdamW")
        assert out["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]  # torch's names and step type
        assert out["step_value"] == ("Tensor", 6.0)
        assert out["compiled_losses"] == pytest.approx(out["torch_losses"], rel=FP32_TOL, abs=FP32_TOL)
        for name, value in out["compiled_params"].items():
            torch.testing.assert_close(value, out["torch_params"][name], rtol=FP32_TOL, atol=FP32_TOL)
        # resume: the compiled optimizer continues exactly; torch's AdamW continues from its state
        assert out["resumed"]["compiled"] == out["compiled_losses"][3:]
        assert out["resumed"]["torch"] == pytest.approx(out["compiled_losses"][3:], rel=FP32_TOL, abs=FP32_TOL)
