"""Steps that must not be applied: a non-finite gradient norm, and no backward since the last step.

A NaN reaching the optimizer turns every weight into NaN. At every stage and precision the
step is skipped, logged, counted in ``skipped_steps``, and the lr schedule does not advance;
fp32/bf16 change no scale, fp16 keeps its loss-scale rules (``test_fp16_overflow.py``). The
NaN is injected on one rank only: the norm is global, so every rank skips together.
"""
import logging

import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import base_config, make_model, rank_micro_batch

NUM_STEPS, NAN_STEP = 3, 1
SCHEDULER = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 10}}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _capture():
    handler = _Records()
    logging.getLogger("deepscale").addHandler(handler)
    return handler


def _engine(stage, world, precision=None):
    import deepscale
    model = make_model()
    cfg = base_config(2, 1, world, scheduler=SCHEDULER, zero_optimization={"stage": stage})
    if precision:
        cfg[precision] = {"enabled": True}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _weights(engine):
    return [p.detach().float().clone() for p in engine.module.parameters()]


def _nan_run(stage):
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        engine = _engine(stage, world, None if precision == "fp32" else precision)
        handler = _capture()
        lrs, changed, overflow = [], [], []
        for step in range(NUM_STEPS):
            x, y = rank_micro_batch(step, 0, rank, 2, 1, world)
            if step == NAN_STEP and rank == world - 1:
                x[0, 0] = float("nan")
            before = _weights(engine)
            engine.backward(engine(x, y))
            engine.step()
            changed.append(any(not torch.equal(a, b) for a, b in zip(before, _weights(engine))))
            lrs.append(engine.get_lr()[0])
            # what initialize returned; Accelerate's step_was_skipped reads its ``overflow``
            overflow.append(getattr(engine.optimizer, "overflow", None))
        logging.getLogger("deepscale").removeHandler(handler)
        finite = all(torch.isfinite(w).all().item() for w in _weights(engine))
        out[precision] = dict(finite=finite, changed=changed, lrs=lrs, overflow=overflow, skipped=engine.skipped_steps,
                              global_steps=engine.global_steps, scale=engine.loss_scale,
                              logged=any("skipping" in m for m in handler.messages))
        engine.destroy()
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nan_gradient_skips_step_at_every_precision(stage):
    for rank, per_precision in enumerate(run_distributed(_nan_run, 2, args=(stage,))):
        for precision, r in per_precision.items():
            where = f"stage {stage} {precision} rank {rank}"
            assert r["finite"], f"{where}: weights became non-finite"
            assert r["changed"] == [True, False, True], f"{where}: applied steps {r['changed']}"
            assert r["skipped"] == 1 and r["global_steps"] == NUM_STEPS, where
            assert r["lrs"][NAN_STEP] == r["lrs"][NAN_STEP - 1] < r["lrs"][NAN_STEP + 1], \
                f"{where}: lr schedule moved on the skipped step {r['lrs']}"
            if precision != "fp16":
                assert r["scale"] == 1.0, where
            if precision != "fp32" or stage > 0:  # fp32 stage 0 returns the torch optimizer itself
                assert r["overflow"] == [False, True, False], f"{where}: optimizer.overflow {r['overflow']}"
            if rank == 0:  # the warning is logged once, by rank 0
                assert r["logged"], f"{where}: the skipped step was not logged"


@pytest.mark.parametrize("stage", [0, 2])
def test_step_without_backward_warns_and_changes_nothing(stage):
    engine = _engine(stage, 1)
    x, y = rank_micro_batch(0, 0, 0, 2, 1, 1)
    engine.backward(engine(x, y))
    engine.step()
    handler = _capture()
    before, lr = _weights(engine), engine.get_lr()
    engine.step()  # no backward since the last step
    logging.getLogger("deepscale").removeHandler(handler)
    assert any("no engine.backward() since the last step" in m for m in handler.messages)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(engine)))
    assert engine.get_lr() == lr
    assert engine.skipped_steps == 1 and engine.global_steps == 2
    engine.backward(engine(x, y))  # and the next real step applies again
    engine.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(engine)))
    engine.destroy()
