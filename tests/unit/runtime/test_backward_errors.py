"""A backward that raises inside ``engine.backward`` leaves the engine usable and disarmed.

What would fail: the gradient hooks staying armed after the error (a later backward that is not
the engine's, here a plain ``loss.backward()`` the user then clears with ``zero_grad()``, would
be taken into the engine's buffers and applied at the next step), or ZeRO-3's coordinator
staying in its backward state (the next forward would be taken for a recompute). Checked with
SGD against an engine that never saw the error: 2 processes, fp32, 1e-6 absolute.
"""
import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import make_model, rank_micro_batch

WORLD, MICRO_BS = 2, 2


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom in backward")


def _run(stage: int, with_error: bool):
    import torch.distributed as dist

    import deepscale
    rank = dist.get_rank()
    model = make_model()
    cfg = {"train_batch_size": MICRO_BS * WORLD, "train_micro_batch_size_per_gpu": MICRO_BS,
           "steps_per_print": 1000, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = deepscale.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                           config=cfg)
    x, y = rank_micro_batch(0, 0, rank, MICRO_BS, 1, WORLD)
    if with_error:
        loss = engine(x, y)
        with pytest.raises(RuntimeError, match="boom in backward"):
            engine.backward(_Boom.apply(loss))
        model(x, y).mul(100.0).backward()  # not the engine's backward: its gradients stay in param.grad
        model.zero_grad()  # ... where the user clears them
    for step in range(2):
        x, y = rank_micro_batch(step + 1, 0, rank, MICRO_BS, 1, WORLD)
        engine.backward(engine(x, y))
        engine.step()
    import deepscale.zero
    with deepscale.zero.GatheredParameters(list(model.parameters())):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.destroy()
    return params


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_after_a_backward_that_raised_trains_like_one_that_never_did(stage):
    clean = run_distributed(_run, WORLD, args=(stage, False))
    after_error = run_distributed(_run, WORLD, args=(stage, True))
    for want, got in zip(clean, after_error):
        for name, ref in want.items():
            torch.testing.assert_close(got[name], ref, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
