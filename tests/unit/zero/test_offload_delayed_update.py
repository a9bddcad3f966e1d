"""The one-step delayed parameter update (DPU) equals applying every update one step late.

After ``delayed_param_update_warmup_steps`` ordinary steps, the forward and backward of step s
run on the weights of step s-2 (the update of step s-1 is still running on the host), and the
update of step s applies that gradient to the masters of step s-1. A plain single-process
PyTorch reference does exactly that with an explicit history of weights.
"""
import torch

from dist_harness import run_distributed
from _offload_helpers import offload_kwargs
from _zero_test_helpers import LR, WD, build_engine, module_params, train
from engine_test_models import global_batch, make_model

NUM_STEPS, WARMUP, MICRO_BS = 6, 2, 2


def _run(stage, delayed):
    extra = {"delayed_param_update": delayed, "delayed_param_update_warmup_steps": WARMUP}
    engine = build_engine(stage, 2, **offload_kwargs("cpu", "", **extra))
    losses = train(engine, 2, range(NUM_STEPS))
    engine._train_opt._finish_delayed_update()  # what a checkpoint save or destroy does
    params = module_params(engine)
    engine.destroy()
    return losses, params


def _reference():
    master, used = make_model(), make_model()
    opt = torch.optim.AdamW(master.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.99))
    history = [[p.detach().clone() for p in master.parameters()]]
    losses = []
    for step in range(1, NUM_STEPS + 1):
        weights = history[step - 1] if step <= WARMUP + 1 else history[step - 2]
        with torch.no_grad():
            for p, w in zip(used.parameters(), weights):
                p.copy_(w)
        x, y = global_batch(step - 1, MICRO_BS * 2)
        loss = used(x, y)
        loss.backward()
        for p, q in zip(master.parameters(), used.parameters()):
            p.grad, q.grad = q.grad, None
        opt.step()
        opt.zero_grad()
        history.append([p.detach().clone() for p in master.parameters()])
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in master.named_parameters()}


def test_delayed_update_is_one_step_late():
    ref_losses, ref_params = _reference()
    for stage in (2, 3):
        for losses, params in run_distributed(_run, 2, args=(stage, True)):
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
            for name, want in ref_params.items():
                rel = ((params[name] - want).norm() / want.norm()).item()
                assert rel < 1e-5, f"stage {stage} {name}: relative error {rel:.2e}"
    plain, _ = run_distributed(_run, 2, args=(2, False))[0]
    # the same until the first delayed step acts, and then the delay does change numerics
    torch.testing.assert_close(torch.tensor(plain[:WARMUP + 1]), torch.tensor(ref_losses[:WARMUP + 1]), rtol=1e-5,
                               atol=1e-7)
    assert abs(plain[WARMUP + 1] - ref_losses[WARMUP + 1]) > 1e-4 * abs(ref_losses[WARMUP + 1])
