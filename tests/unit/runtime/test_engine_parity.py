"""Data-parallel parity: N ranks over the same global batch match one plain-PyTorch process.

Tolerances: fp32 1e-5 relative (losses and parameters); bf16/fp16 track the fp32 loss
trajectory within 2e-2 absolute (they round activations and weights to 8/11-bit mantissas).
"""
import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import base_config, make_model, rank_micro_batch, reference_run

NUM_STEPS = 6
MICRO_BS = 2


def _train(world_size, gas, num_steps, extra_cfg, model_kwargs=None):
    import deepscale
    import torch.distributed as dist
    model = make_model(**(model_kwargs or {}))
    cfg = base_config(MICRO_BS, gas, world_size, **extra_cfg)
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    rank, losses = dist.get_rank(), []
    for step in range(num_steps):
        step_loss = torch.zeros(())
        for micro in range(gas):
            x, y = rank_micro_batch(step, micro, rank, MICRO_BS, gas, world_size)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / gas
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world_size)
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return losses, params, engine.global_steps


def _assert_close_params(got, want, rtol, atol=1e-6):
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("gas", [1, 2])
def test_fp32_matches_single_process(world_size, gas):
    ref_losses, ref_params = reference_run(NUM_STEPS, MICRO_BS * gas * world_size)
    results = run_distributed(_train, world_size, args=(world_size, gas, NUM_STEPS, {}))
    for losses, params, steps in results:
        assert steps == NUM_STEPS
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        _assert_close_params(params, ref_params, rtol=1e-5)


def test_fp32_clipping_matches_reference():
    ref_losses, ref_params = reference_run(NUM_STEPS, MICRO_BS * 2, clip=0.05)
    results = run_distributed(_train, 2, args=(2, 1, NUM_STEPS, {"gradient_clipping": 0.05}))
    for losses, params, _ in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        _assert_close_params(params, ref_params, rtol=1e-5)


def test_frozen_layer_stays_and_rest_matches():
    ref_losses, ref_params = reference_run(NUM_STEPS, MICRO_BS * 2, frozen=True)
    results = run_distributed(_train, 2, args=(2, 1, NUM_STEPS, {}, {"frozen": True}))
    initial = dict(make_model(frozen=True).named_parameters())
    for losses, params, _ in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        _assert_close_params(params, ref_params, rtol=1e-5)
        torch.testing.assert_close(params["layers.0.weight"], initial["layers.0.weight"].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_tracks_fp32(precision):
    fp32_losses, _, _ = run_distributed(_train, 2, args=(2, 1, NUM_STEPS, {}))[0]
    low_cfg = {precision: {"enabled": True}}
    if precision == "fp16":
        low_cfg["fp16"]["initial_scale_power"] = 8
    low_losses, params, steps = run_distributed(_train, 2, args=(2, 1, NUM_STEPS, low_cfg))[0]
    assert steps == NUM_STEPS
    diffs = [abs(a - b) for a, b in zip(low_losses, fp32_losses)]
    assert max(diffs) < 2e-2, f"{precision} drifted from fp32: {diffs}"
    assert all(torch.isfinite(p).all() for p in params.values())
