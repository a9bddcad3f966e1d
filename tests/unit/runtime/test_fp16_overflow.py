"""fp16 dynamic loss scaling: injected overflows skip the step and move the scale by the rules."""
import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import base_config, make_model, rank_micro_batch

# Overflow pattern and the scale expected after each step, worked out by hand from the rules
# (initial 2**4, window 2, hysteresis 2, minimum 4): an overflow first spends the hysteresis,
# then halves the scale (not below the minimum); `window` clean steps after the last overflow
# double it and restore the hysteresis.
OVERFLOWS = [False, True, True, False, False, True, True, True, True, False]
EXPECTED_SCALES = [16, 16, 8, 8, 16, 16, 8, 4, 4, 4]
FP16_CFG = {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 2, "hysteresis": 2,
            "min_loss_scale": 4}


def _snapshot(engine):
    params = [p.detach().clone() for p in engine.module.parameters()]
    state = engine.optimizer.optimizer.state
    moments = [state[m]["exp_avg"].clone() for m in engine.optimizer.master_params if m in state]
    return params, moments


def _overflow_run(world_size):
    import deepscale
    import torch.distributed as dist
    model = make_model()
    cfg = base_config(2, 1, world_size, fp16=dict(FP16_CFG))
    engine, optimizer, _, _ = deepscale.initialize(model=model, config=cfg)
    rank, records = dist.get_rank(), []
    for step, overflow in enumerate(OVERFLOWS):
        x, y = rank_micro_batch(step, 0, rank, 2, 1, world_size)
        if overflow and rank == world_size - 1:
            x[0, 0] = float("inf")  # only the last rank sees it: the skip must still be global
        before_params, before_moments = _snapshot(engine)
        engine.backward(engine(x, y))
        engine.step()
        after_params, after_moments = _snapshot(engine)
        params_same = all(torch.equal(a, b) for a, b in zip(before_params, after_params))
        moments_same = (len(before_moments) == len(after_moments)
                        and all(torch.equal(a, b) for a, b in zip(before_moments, after_moments)))
        records.append((engine.loss_scale, params_same, moments_same, engine.skipped_steps))
    return records, engine.global_steps


@pytest.mark.parametrize("world_size", [1, 2])
def test_overflow_skips_and_scale_follows_rules(world_size):
    for records, global_steps in run_distributed(_overflow_run, world_size, args=(world_size,)):
        assert global_steps == len(OVERFLOWS)
        assert [r[0] for r in records] == EXPECTED_SCALES
        for step, (overflow, (_, params_same, moments_same, skipped)) in enumerate(zip(OVERFLOWS, records)):
            assert params_same == overflow, f"step {step}: params changed={not params_same}, overflow={overflow}"
            if overflow:
                assert moments_same, f"step {step}: optimizer state moved on an overflow step"
            assert skipped == sum(OVERFLOWS[:step + 1])


def test_raise_at_min_scale_stops():
    import deepscale
    model = make_model()
    cfg = base_config(2, 1, 1, fp16={"enabled": True, "initial_scale_power": 2, "hysteresis": 1,
                                     "min_loss_scale": 4, "raise_error_at_min_scale": True})
    engine, _, _, _ = deepscale.initialize(model=model, config=cfg)
    x, y = rank_micro_batch(0, 0, 0, 2, 1, 1)
    x[0, 0] = float("nan")
    engine.backward(engine(x, y))
    with pytest.raises(RuntimeError, match="minimum"):
        engine.step()
    engine.destroy()


def test_static_loss_scale_never_moves():
    import deepscale
    model = make_model()
    engine, _, _, _ = deepscale.initialize(model=model, config=base_config(2, 1, 1, fp16={"enabled": True,
                                                                                          "loss_scale": 128}))
    for step in range(3):
        x, y = rank_micro_batch(step, 0, 0, 2, 1, 1)
        if step == 1:
            x[0, 0] = float("inf")
        engine.backward(engine(x, y))
        engine.step()
        assert engine.loss_scale == 128
    assert engine.skipped_steps == 1
    engine.destroy()
