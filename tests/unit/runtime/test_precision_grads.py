"""Mixed-precision gradient handling that parity-with-Adam tests cannot see.

* fp16 clipping compares the *unscaled* global norm with ``gradient_clipping``: the loss scale
  multiplies every gradient and must not decide whether (or how much) to clip.
* bf16 models accumulate gradients over micro-steps in fp32 (the README's promise): the
  accumulated gradient equals the fp32 sum of the per-micro-step bf16 gradients, which differs
  measurably from a bf16 running sum.

Every ZeRO stage, one process. Tolerances are stated per check below.
"""
import pytest
import torch

from engine_test_models import global_batch, make_model

STAGES = [0, 1, 2, 3]
LR, LOSS_SCALE, BATCH = 0.1, 1024.0, 8


def _engine(stage, precision, gas=1, clip=0.0):
    import deepscale
    model = make_model()
    cfg = {"train_batch_size": BATCH * gas, "train_micro_batch_size_per_gpu": BATCH,
           "gradient_accumulation_steps": gas, "steps_per_print": 1000,
           "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_optimization": {"stage": stage},
           precision: {"enabled": True}}
    if precision == "fp16":
        cfg["fp16"]["loss_scale"] = LOSS_SCALE  # static: no scale changes between runs
    cfg["gradient_clipping"] = clip  # explicit: the default (1.0, as DeepSpeed) would clip
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _fp32_grad_norm_and_update(clip):
    model = make_model()
    x, y = global_batch(0, BATCH)
    model(x, y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    return norm, {n: -LR * p.grad for n, p in model.named_parameters()}


def _fp16_master_update(stage, clip):
    from deepscale.utils import safe_get_full_fp32_param
    engine = _engine(stage, "fp16", clip=clip)
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    x, y = global_batch(0, BATCH)
    engine.backward(engine(x, y))
    engine.step()
    update = {n: safe_get_full_fp32_param(p) - before[n] for n, p in engine.module.named_parameters()}
    engine.destroy()
    return update


@pytest.mark.parametrize("stage", STAGES)
def test_fp16_clipping_uses_the_unscaled_norm(stage):
    norm, _ = _fp32_grad_norm_and_update(float("inf"))
    # Above the true norm but far below norm * loss_scale: nothing may be clipped.
    # Below the true norm: the update shrinks by clip / norm, not by clip / (norm * scale).
    for clip in (2.0 * norm, 0.5 * norm):
        _, want = _fp32_grad_norm_and_update(clip)
        got = _fp16_master_update(stage, clip)
        for name, ref in want.items():
            # fp16 forward/backward: a few 1e-3 relative on the gradient.
            rel = ((got[name] - ref).norm() / ref.norm()).item()
            assert rel < 2e-2, f"stage {stage} clip {clip / norm:.1f}x norm: {name} update off by {rel:.3f}"


def _micro_grads_bf16(gas):
    """Each micro-step's bf16 gradient of the same model/data the engine sees."""
    model = make_model().to(torch.bfloat16)
    per_micro = []
    for micro in range(gas):
        x, y = global_batch(micro, BATCH)
        (model(x.to(torch.bfloat16), y.to(torch.bfloat16)).float() * (1.0 / gas)).backward()
        per_micro.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    return per_micro


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_accumulates_micro_steps_in_fp32(stage):
    from deepscale.utils import safe_get_full_grad
    gas = 8
    per_micro = _micro_grads_bf16(gas)
    fp32_sum = {n: sum(g[n].float() for g in per_micro) for n in per_micro[0]}
    bf16_sum = {}
    for grads in per_micro:
        for n, g in grads.items():
            bf16_sum[n] = g if n not in bf16_sum else bf16_sum[n] + g
    # The test is only meaningful if bf16 accumulation visibly loses precision here.
    worst = max(((fp32_sum[n] - bf16_sum[n].float()).norm() / fp32_sum[n].norm()).item() for n in fp32_sum)
    assert worst > 1e-3, f"data too benign: bf16 and fp32 sums differ by only {worst:.2e}"

    engine = _engine(stage, "bf16", gas=gas)
    for micro in range(gas):
        x, y = global_batch(micro, BATCH)
        engine.backward(engine(x, y))
        if micro < gas - 1:
            engine.step()
    got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    engine.step()
    engine.destroy()
    for name, want in fp32_sum.items():
        # Same bf16 micro-gradients summed in fp32 in the same order: equal up to fp32 rounding.
        rel = ((got[name].float() - want).norm() / want.norm()).item()
        assert rel < 1e-6, f"stage {stage} {name}: accumulated gradient is {rel:.2e} from the fp32 sum"
