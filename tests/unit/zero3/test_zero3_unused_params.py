"""Parameters that get no gradient in a step: ZeRO-3 matches stage 0 step by step (fp32, SGD
without momentum so the gradient's scale shows directly in the weights).

Two cases: a module skipped on some steps by every rank, and a module whose output is used on
rank 0 only (it runs everywhere, but its parameters get a gradient on rank 0 alone). Each is
run with one parameter group per module and with the default thresholds (one group).
"""
import pytest
import torch

from dist_harness import run_distributed

NUM_STEPS = 6
WIDTH = 8
SMALL_GROUPS = {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1}


class PartlyUsed(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.stem = torch.nn.Linear(width, width)
        self.mid = torch.nn.Linear(width, width)
        self.extra = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x, use_mid: bool, use_extra: bool):
        h = torch.tanh(self.stem(x))
        if use_mid:
            h = h + torch.tanh(self.mid(h))
        e = self.extra(h)  # runs on every rank ...
        if use_extra:      # ... but feeds the loss only where use_extra
            h = h + torch.tanh(e)
        return self.head(h).pow(2).mean()


def _flags(case: str, step: int, rank: int):
    if case == "skipped_on_some_steps":
        return step % 2 == 0, True
    return True, rank == 0  # "unused_on_one_rank"


CLIP = 0.0  # unclipped: the gradient scale shows directly in the weights (the default would clip)


def _train(world, case, width, stage, zero_extra):
    import torch.distributed as dist
    import deepscale
    import deepscale.zero
    torch.manual_seed(3)
    model = PartlyUsed(width)
    cfg = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "gradient_clipping": CLIP,
           "zero_optimization": {"stage": stage, **(zero_extra if stage == 3 else {})}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    rank, losses, params = dist.get_rank(), [], []
    for step in range(NUM_STEPS):
        x = torch.randn(2 * world, width, generator=torch.Generator().manual_seed(100 + step))[2 * rank:2 * rank + 2]
        loss = engine(x, *_flags(case, step, rank))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        with deepscale.zero.GatheredParameters(list(engine.module.parameters())):
            params.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
    engine.destroy()
    return losses, params


def _run(world, case, width, zero_extra):
    return {stage: _train(world, case, width, stage, zero_extra) for stage in (0, 3)}


CASES = [("skipped_on_some_steps", WIDTH, SMALL_GROUPS), ("unused_on_one_rank", WIDTH, SMALL_GROUPS),
         ("skipped_on_some_steps", 400, {}), ("unused_on_one_rank", 400, {})]


@pytest.mark.parametrize("case,width,zero_extra", CASES,
                         ids=[f"{c}-{'group_per_module' if z else 'defaults'}" for c, _, z in CASES])
def test_zero3_matches_stage0_when_parameters_get_no_gradient(case, width, zero_extra):
    for rank, result in enumerate(run_distributed(_run, 2, args=(2, case, width, zero_extra))):
        losses0, params0 = result[0]
        losses3, params3 = result[3]
        for step in range(NUM_STEPS):
            assert losses3[step] == pytest.approx(losses0[step], rel=1e-6, abs=1e-6), (rank, step, losses3, losses0)
            for name, want in params0[step].items():
                torch.testing.assert_close(params3[step][name], want, rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} {name}: {m}")
        # the case exercises what it claims: the partly used parameters did move
        assert not torch.equal(params3[-1]["extra.weight"], params3[0]["extra.weight"])
        assert not torch.equal(params3[-1]["mid.weight"], params3[0]["mid.weight"])
