"""ZeRO stages 1 and 2 with bf16 and fp16: same trajectory as stage 0, overflow seen by all ranks."""
import pytest
import torch

from dist_harness import run_distributed
from _zero_test_helpers import build_engine, module_params, train

NUM_STEPS = 4


def _low_precision_runs(world, precision):
    extra = {precision: {"enabled": True}}
    if precision == "fp16":
        extra["fp16"]["initial_scale_power"] = 8
    out = {}
    for stage in (0, 1, 2):
        engine = build_engine(stage, world, two_groups=True, extra_cfg=extra, clip=1.0)
        out[stage] = (train(engine, world, range(NUM_STEPS)), module_params(engine), engine.loss_scale,
                      engine.skipped_steps)
        engine.destroy()
    return out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_stages_match_stage0(precision):
    for per_rank in run_distributed(_low_precision_runs, 2, args=(2, precision)):
        losses0, params0, scale0, skipped0 = per_rank[0]
        for stage in (1, 2):
            losses, params, scale, skipped = per_rank[stage]
            # Same fp32 master arithmetic; only the 16-bit rounding of the model is shared.
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses0), rtol=1e-3, atol=1e-3)
            for name, value in params0.items():
                torch.testing.assert_close(params[name], value, rtol=1e-2, atol=1e-2)
            assert (scale, skipped) == (scale0, skipped0)


def _overflow_in_one_partition(stage, world):
    """Rank 0 puts an inf into one gradient element that rank 1 owns: every rank must skip."""
    import torch.distributed as dist
    fp16 = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}  # halve on the first overflow
    engine = build_engine(stage, world, extra_cfg={"fp16": fp16})
    opt = engine._train_opt
    target, frag = next((p, b.plan.fragment(1, i)) for b in opt.buckets for i, p in enumerate(b.params)
                        if b.plan.fragment(1, i) is not None)

    def poison(grad):
        grad = grad.clone()
        grad.view(-1)[frag.param_start] = float("inf")
        return grad
    if dist.get_rank() == 0:
        handle = target.register_hook(poison)
    before = module_params(engine)
    train(engine, world, range(1))
    if dist.get_rank() == 0:
        handle.remove()
    after_overflow = module_params(engine)
    train(engine, world, range(1, 2))
    return (engine.skipped_steps, engine.loss_scale, engine.get_global_grad_norm(),
            all(torch.equal(before[n], after_overflow[n]) for n in before))


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_overflow_in_one_partition_skips_on_every_rank(stage):
    results = run_distributed(_overflow_in_one_partition, 2, args=(stage, 2))
    for skipped, scale, norm, unchanged in results:
        assert skipped == 1 and unchanged
        assert scale == 2.0 ** 7  # halved once from 2**8
        assert norm is not None and norm > 0  # the second step was applied
