"""Every ZeRO stage, 2 ranks, SGD: weights and the global gradient norm match one plain process.

Adam is nearly invariant to the scale of the gradient, so a parity test with Adam barely
notices a missing data-parallel average (every gradient twice too large). SGD without momentum
moves each weight by ``lr * grad``, and ``get_global_grad_norm()`` reports the norm itself, so
a wrong scale, a stale gradient or a rank's missing contribution shows up directly.

Tolerance: 1e-5 relative (fp32 summation order across ranks and buckets).
"""
import pytest
import torch

from dist_harness import run_distributed
from _zero_test_helpers import MICRO_BS, build_engine, module_params, train
from engine_test_models import global_batch, make_model

NUM_STEPS, GAS, LR, CLIP = 4, 2, 0.05, 0.3
SGD = {"optimizer": {"type": "SGD", "params": {"lr": LR}}}


def _run(stage: int, clip: float):
    engine = build_engine(stage, 2, gas=GAS, clip=clip, extra_cfg=SGD)
    norms = []
    for step in range(NUM_STEPS):
        train(engine, 2, [step], gas=GAS)
        norms.append(engine.get_global_grad_norm())
    params = module_params(engine)
    engine.destroy()
    return norms, params


def _reference(clip: float):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    norms = []
    for step in range(NUM_STEPS):
        x, y = global_batch(step, MICRO_BS * GAS * 2)
        model(x, y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf")).item())
        opt.step()
        opt.zero_grad()
    return norms, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("clip", [0.0, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sgd_weights_and_grad_norm_match_single_process(stage, clip):
    want_norms, want_params = _reference(clip)
    if clip:
        assert min(want_norms) > CLIP, "the clipping case must actually clip"
    for norms, params in run_distributed(_run, 2, args=(stage, clip)):
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms), rtol=1e-5, atol=0,
                                   msg=lambda m: f"stage {stage} get_global_grad_norm: {m}")
        for name, want in want_params.items():
            torch.testing.assert_close(params[name], want, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"stage {stage} {name}: {m}")
