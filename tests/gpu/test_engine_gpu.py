"""The engine on one CUDA device: fp32 parity with a CPU reference, fp16/bf16 training.

Skipped without CUDA (the ``gpu`` marker). Tolerances: fp32 1e-4 relative (TF32 is off, but
GPU reductions run in another order than the CPU's); fp16/bf16 within 2e-2 of fp32.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit"))
from engine_test_models import base_config, make_model, rank_micro_batch, reference_run  # noqa: E402

pytestmark = pytest.mark.gpu
STEPS = 6


def _run(extra):
    import deepscale
    torch.backends.cuda.matmul.allow_tf32 = False
    engine, *_ = deepscale.initialize(model=make_model(), config=base_config(2, 1, 1, **extra))
    assert engine.device.type == "cuda"
    losses = []
    for step in range(STEPS):
        x, y = (t.to(engine.device) for t in rank_micro_batch(step, 0, 0, 2, 1, 1))
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    import deepscale.zero
    with deepscale.zero.GatheredParameters(list(engine.module.parameters())):  # a no-op below stage 3
        params = {n: p.detach().float().cpu() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return losses, params


def test_fp32_on_cuda_matches_cpu_reference():
    ref_losses, ref_params = reference_run(STEPS, 2)
    losses, params = _run({})
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_on_cuda_tracks_fp32(precision):
    fp32_losses, _ = _run({})
    low_losses, _ = _run({precision: {"enabled": True}})
    assert max(abs(a - b) for a, b in zip(low_losses, fp32_losses)) < 2e-2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_on_cuda_match_stage0(stage):
    # One device: the partitioning code paths run (world size 1) on CUDA buffers and streams;
    # with NCCL and several GPUs, run tests/unit/zero* with --dist-backend nccl instead.
    base_losses, base_params = _run({})
    losses, params = _run({"zero_optimization": {"stage": stage}})
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=1e-5, atol=1e-6)
    for name, ref in base_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-6)
