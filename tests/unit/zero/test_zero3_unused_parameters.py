"""ZeRO stage 3 honours ``ignore_unused_parameters: true`` (the default): a parameter that gets no
gradient in some steps trains like plain PyTorch with a zero gradient (fp32, 1e-5 relative). The
``false`` setting is refused at stage 3 (tests/unit/config/test_config_stage_keys.py)."""
import torch

from dist_harness import run_distributed
from _zero_test_helpers import MICRO_BS, build_engine, reference, train

NUM_STEPS = 4
WORLD = 2


def _run():
    import deepscale.zero
    engine = build_engine(3, WORLD, model_kwargs={"unused": True}, ignore_unused_parameters=True)
    losses = train(engine, WORLD, range(NUM_STEPS), unused_alternate=True)
    with deepscale.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return losses, params


def test_stage3_trains_with_parameters_that_get_no_gradient():
    ref_losses, ref_params = reference(NUM_STEPS, MICRO_BS * WORLD, unused_alternate=True,
                                       model_kwargs={"unused": True})
    for losses, params in run_distributed(_run, WORLD):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        assert "extra.weight" in params
        for name, want in ref_params.items():
            rel = ((params[name] - want).norm() / want.norm()).item()
            assert rel < 1e-5, f"{name}: relative error {rel:.2e} vs reference"
