"""The groups a forward uses last stay gathered into the backward (coordinator Note on the tail).

What would fail: releasing the tail at the end of the forward again (the backward then
all-gathers those groups once more: a whole extra gather per step for a small model), keeping
groups the window does not cover, or a kept group outliving a step with its old values.
"""
import torch

from dist_harness import run_distributed
from _zero3_helpers import build_gpt_engine, full_params
from _zero3_models import gpt_rank_batch

WORLD = 2


def _gathers_per_phase(reuse_distance):
    import torch.distributed as dist
    # a low persistence threshold: the tiny model's weights are gathered, not persistent
    engine = build_gpt_engine(3, WORLD, stage3_param_persistence_threshold=20,
                              stage3_max_reuse_distance=reuse_distance)
    runner = engine.optimizer.runner
    phases = []
    for step in range(3):
        idx, tgt = gpt_rank_batch(step, 0, dist.get_rank(), 2, 1, WORLD)
        before = runner.num_all_gathers
        loss = engine(idx, tgt)
        middle = runner.num_all_gathers
        engine.backward(loss)
        phases.append((middle - before, runner.num_all_gathers - middle))
        engine.step()
    engine.destroy()
    return phases


def test_backward_reuses_the_tail_of_the_forward_without_gathering_again():
    kept = run_distributed(_gathers_per_phase, WORLD, args=(1_000_000_000,))[0]
    released = run_distributed(_gathers_per_phase, WORLD, args=(0,))[0]
    # step 0 has no recorded order yet; from step 1 on the tail is kept
    assert all(fwd > 0 for fwd, _ in kept), kept
    assert [bwd for _, bwd in kept[1:]] == [0, 0], kept
    # control: with no reuse window the backward gathers the groups again
    assert all(bwd > 0 for _, bwd in released), released


def _extra_forward_then_step(stage):
    import torch.distributed as dist
    torch.manual_seed(0)
    engine = build_gpt_engine(stage, WORLD)
    rank, losses = dist.get_rank(), []
    for step in range(3):
        idx, tgt = gpt_rank_batch(step, 0, rank, 2, 1, WORLD)
        loss = engine(idx, tgt)
        engine.backward(loss)
        engine(idx, tgt)  # a forward with no backward: stage 3 keeps its tail gathered
        engine.step()
        losses.append(loss.item())
    params = full_params(engine)
    engine.destroy()
    return losses, params


def test_a_kept_group_never_serves_values_from_before_a_step():
    for (losses0, params0), (losses3, params3) in zip(run_distributed(_extra_forward_then_step, WORLD, args=(0,)),
                                                      run_distributed(_extra_forward_then_step, WORLD, args=(3,))):
        torch.testing.assert_close(torch.tensor(losses3), torch.tensor(losses0), rtol=1e-5, atol=1e-6)
        for name, want in params0.items():
            torch.testing.assert_close(params3[name], want, rtol=1e-5, atol=1e-6)
