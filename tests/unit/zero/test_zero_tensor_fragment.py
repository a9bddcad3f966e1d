"""deepscale.utils.safe_get_full_* / safe_set_full_*: the same whole tensors at every stage (0-3)."""
import torch

from dist_harness import run_distributed
from _zero_test_helpers import build_engine, rank_micro_batch_for, train

STAGES = (0, 1, 2, 3)


def _collect(world):
    from deepscale.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                                 safe_set_full_fp32_param, safe_set_full_grad, safe_set_full_optimizer_state)
    import deepscale.zero
    out = {}
    for stage in STAGES:
        engine = build_engine(stage, world, model_kwargs={"frozen": True})
        train(engine, world, range(2))
        x, y = rank_micro_batch_for(2, world)
        engine.backward(engine(x, y))
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        grads = {n: safe_get_full_grad(p) for n, p in named}
        engine.step()
        fp32 = {n: safe_get_full_fp32_param(p) for n, p in named}
        exp_avg = {n: safe_get_full_optimizer_state(p, "exp_avg") for n, p in named}
        frozen = safe_get_full_fp32_param(engine.module.layers[0].weight)
        name, param = named[-1]
        safe_set_full_fp32_param(param, torch.full(param.shape, 0.5))
        safe_set_full_optimizer_state(param, torch.full(param.shape, 2.0), "exp_avg")
        safe_set_full_grad(param, torch.full(param.shape, 3.0))
        with deepscale.zero.GatheredParameters([param]):  # a no-op below stage 3
            model_weight = param.detach().clone()
        roundtrip = (safe_get_full_fp32_param(param), safe_get_full_optimizer_state(param, "exp_avg"),
                     safe_get_full_grad(param), model_weight)
        out[stage] = (grads, fp32, exp_avg, frozen, roundtrip)
        engine.destroy()
    return out


def test_full_tensors_agree_across_stages_and_setters_round_trip():
    for per_rank in run_distributed(_collect, 2, args=(2,)):
        grads0, fp32_0, exp_avg0, _, _ = per_rank[0]
        for stage in STAGES:
            grads, fp32, exp_avg, frozen, (p32, state, grad, model_weight) = per_rank[stage]
            assert frozen is None
            for name in grads0:
                torch.testing.assert_close(grads[name], grads0[name], rtol=1e-6, atol=1e-8)
                torch.testing.assert_close(fp32[name], fp32_0[name], rtol=1e-6, atol=1e-8)
                torch.testing.assert_close(exp_avg[name], exp_avg0[name], rtol=1e-6, atol=1e-8)
                assert grads[name].abs().sum() > 0
            assert torch.all(p32 == 0.5) and torch.all(model_weight == 0.5)
            assert torch.all(state == 2.0) and torch.all(grad == 3.0)
