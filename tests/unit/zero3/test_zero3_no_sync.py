"""engine.no_sync() at stages 2 and 3: gradients are partitioned, so they are still reduced on
every backward; training inside no_sync must give the same result as without it (fp32, 1e-6)."""
import torch

from dist_harness import run_distributed
from _zero3_helpers import MICRO_BS, STAGE3_SMALL, build_gpt_engine, full_params
from _zero3_models import gpt_rank_batch, make_gpt

GAS, NUM_STEPS = 2, 4


def _train(engine, world, use_no_sync):
    import torch.distributed as dist
    rank, losses = dist.get_rank(), []
    for step in range(NUM_STEPS):
        for micro in range(GAS):
            idx, tgt = gpt_rank_batch(step, micro, rank, MICRO_BS, GAS, world)
            if use_no_sync and micro < GAS - 1:
                with engine.no_sync():
                    loss = engine(idx, tgt)
                    engine.backward(loss)
                engine.step()  # not a boundary: only advances the micro-step counter
            else:
                loss = engine(idx, tgt)
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
    return losses


def _run(world):
    out = {}
    for stage in (2, 3):
        for use_no_sync in (False, True):
            engine = build_gpt_engine(stage, world, gas=GAS, **STAGE3_SMALL)
            out[(stage, use_no_sync)] = (_train(engine, world, use_no_sync), full_params(engine))
            engine.destroy()
    return out


def test_no_sync_at_partitioned_stages_matches_plain_accumulation():
    initial = {n: p.detach().clone() for n, p in make_gpt().named_parameters()}
    for per_rank in run_distributed(_run, 2, args=(2,)):
        for stage in (2, 3):
            plain_losses, plain_params = per_rank[(stage, False)]
            losses, params = per_rank[(stage, True)]
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-6, atol=1e-7)
            for name, want in plain_params.items():
                torch.testing.assert_close(params[name], want, rtol=1e-6, atol=1e-7)
            moved = max((params[n] - initial[n]).abs().max().item() for n in initial)
            assert moved > 1e-3, "training did not change the parameters"
