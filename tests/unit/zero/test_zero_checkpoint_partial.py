"""Partial loads at stages 1 and 2: ``load_module_only`` and ``load_optimizer_states=False``.

A 2-rank stage-2 checkpoint is loaded at stage 1 and stage 2. Either way the weights (model and
fp32 masters) must be the saved ones and the optimizer must start empty; only a full load
restores the step counters with ``load_optimizer_states=False``, and ``load_module_only``
leaves the counters at zero. After the load the engine must train on from the loaded weights
exactly as a fresh engine built from them (fp32, 1e-6).
"""
import torch

from dist_harness import run_distributed
from _zero_test_helpers import build_engine, module_params, train

SAVE_AT = 2


def _save(world, ckpt_dir):
    engine = build_engine(2, world, two_groups=True)
    train(engine, world, range(SAVE_AT))
    engine.save_checkpoint(ckpt_dir)
    return module_params(engine)


def _load(stage, world, ckpt_dir, saved, how):
    from deepscale.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    engine = build_engine(stage, world, two_groups=True, seed=99)  # other weights: the load must replace them
    if how == "module_only":
        engine.load_checkpoint(ckpt_dir, load_module_only=True)
    else:
        engine.load_checkpoint(ckpt_dir, load_optimizer_states=False)
    named = list(engine.module.named_parameters())
    weights = module_params(engine)
    masters = {n: safe_get_full_fp32_param(p) for n, p in named}
    states = [safe_get_full_optimizer_state(p, "exp_avg") for _, p in named]
    steps = engine.global_steps
    losses = train(engine, world, range(SAVE_AT, SAVE_AT + 2))
    # The same continuation from a fresh engine that starts at the saved weights.
    fresh = build_engine(stage, world, two_groups=True)
    with torch.no_grad():
        for name, param in fresh.module.named_parameters():
            param.copy_(saved[name])
    fresh._train_opt.reseed_masters(fresh.module, saved)
    fresh_losses = train(fresh, world, range(SAVE_AT, SAVE_AT + 2))
    return weights, masters, states, steps, losses, fresh_losses


CASES = [(stage, how, want_steps) for stage in (1, 2)
         for how, want_steps in (("module_only", 0), ("no_optimizer_states", SAVE_AT))]


def _load_all(world, ckpt_dir, saved):
    return [_load(stage, world, ckpt_dir, saved, how) for stage, how, _ in CASES]


def test_load_module_only_and_without_optimizer_states(tmp_path):
    saved = run_distributed(_save, 2, args=(2, str(tmp_path)))[0]
    for per_rank in run_distributed(_load_all, 2, args=(2, str(tmp_path), saved)):
        for (stage, how, want_steps), result in zip(CASES, per_rank):
            _check(f"stage {stage}, {how}", saved, want_steps, *result)


def _check(label, saved, want_steps, weights, masters, states, steps, losses, fresh_losses):
    for name, value in saved.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=lambda m: f"{label}: {m}")
        torch.testing.assert_close(masters[name], value, rtol=0, atol=0, msg=lambda m: f"{label}: {m}")
    assert all(s is None for s in states), f"{label}: optimizer state was loaded"
    assert steps == want_steps, label
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(fresh_losses), rtol=1e-6, atol=1e-7,
                               msg=lambda m: f"{label}: {m}")
