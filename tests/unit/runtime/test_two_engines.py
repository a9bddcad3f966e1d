"""Two engines in one process (a GAN) keep PyTorch's gradient semantics.

The generator's backward also runs through the discriminator. Those gradients must stay in
``param.grad`` where the user's ``netD.zero_grad()`` clears them, instead of being taken into
D's engine and applied at D's next step. Checked against the same loop in plain PyTorch, with
SGD (no scale invariance, so any stale or mis-scaled gradient shows up in the weights).

Tolerances: 1 process: bitwise equal. 2 processes (each rank half of the batch, the engine
averages): 1e-6 absolute / 1e-5 relative, the effect of fp32 summation order.
"""
import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_distributed

NOISE, DATA, HIDDEN = 3, 5, 8
MICRO_BS, NUM_STEPS, LR_D, LR_G = 2, 4, 0.2, 0.1


def _nets():
    torch.manual_seed(7)
    net_g = torch.nn.Sequential(torch.nn.Linear(NOISE, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, DATA))
    net_d = torch.nn.Sequential(torch.nn.Linear(DATA, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    return net_g, net_d


def _batch(step: int, batch_size: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(batch_size, DATA, generator=gen) + 1.0, torch.randn(batch_size, NOISE, generator=gen)


def _gan_step(step_d, step_g, net_d, d_forward, g_forward, net_g, real, noise):
    """One DCGAN iteration: D on real and fake (two backward calls), then G through D."""
    net_d.zero_grad()
    out = d_forward(real)
    err_real = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    fake = g_forward(noise)
    out = d_forward(fake.detach())
    err_fake = F.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
    step_d(err_real, err_fake)
    net_g.zero_grad()
    out = net_d(fake)  # the generator's loss flows through the raw discriminator
    err_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    step_g(err_g)
    return err_real.item() + err_fake.item(), err_g.item()


def _reference(world: int):
    net_g, net_d = _nets()
    opt_d = torch.optim.SGD(net_d.parameters(), lr=LR_D)
    opt_g = torch.optim.SGD(net_g.parameters(), lr=LR_G)

    def step_d(err_real, err_fake):
        err_real.backward()
        err_fake.backward()
        opt_d.step()

    def step_g(err_g):
        err_g.backward()
        opt_g.step()

    for step in range(NUM_STEPS):
        real, noise = _batch(step, MICRO_BS * world)
        _gan_step(step_d, step_g, net_d, net_d, net_g, net_g, real, noise)
    return _params(net_g), _params(net_d)


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _engines(stage: int):
    import deepscale
    import torch.distributed as dist
    net_g, net_d = _nets()
    world = dist.get_world_size()
    cfg = {"train_batch_size": MICRO_BS * world, "train_micro_batch_size_per_gpu": MICRO_BS,
           "steps_per_print": 1000, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 20}}
    engine_g, _, _, _ = deepscale.initialize(model=net_g, optimizer=torch.optim.SGD(net_g.parameters(), lr=LR_G),
                                             config=cfg)
    engine_d, _, _, _ = deepscale.initialize(model=net_d, optimizer=torch.optim.SGD(net_d.parameters(), lr=LR_D),
                                             config=cfg)
    return net_g, net_d, engine_g, engine_d


def _train_gan(stage: int):
    import torch.distributed as dist
    net_g, net_d, engine_g, engine_d = _engines(stage)
    rank, world = dist.get_rank(), dist.get_world_size()

    def step_d(err_real, err_fake):
        engine_d.backward(err_real)
        engine_d.backward(err_fake)
        engine_d.step()

    def step_g(err_g):
        engine_g.backward(err_g)
        engine_g.step()

    for step in range(NUM_STEPS):
        real, noise = _batch(step, MICRO_BS * world)
        mine = slice(rank * MICRO_BS, (rank + 1) * MICRO_BS)
        _gan_step(step_d, step_g, net_d, engine_d, engine_g, net_g, real[mine], noise[mine])
    result = _params(net_g), _params(net_d)
    engine_g.destroy()
    engine_d.destroy()
    return result


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gan_two_engines_match_plain_pytorch(stage, world):
    want_g, want_d = _reference(world)
    for got_g, got_d in run_distributed(_train_gan, world, args=(stage,)):
        for label, got, want in (("G", got_g, want_g), ("D", got_d, want_d)):
            for name, ref in want.items():
                if world == 1:
                    assert torch.equal(got[name], ref), f"{label}.{name}: max diff {(got[name] - ref).abs().max()}"
                else:
                    torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{label}.{name}: {m}")


def _zero_grad_between_micro_steps(stage: int):
    """gas=2 with ``module.zero_grad()`` before the second micro-step: as in PyTorch, only the
    second micro-batch's gradient is applied (stage 0 with an fp32 model, where ``param.grad``
    is the engine's buffer)."""
    import deepscale
    _, net_d = _nets()
    cfg = {"train_batch_size": 2 * MICRO_BS, "train_micro_batch_size_per_gpu": MICRO_BS,
           "gradient_accumulation_steps": 2, "steps_per_print": 1000, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}}
    engine, _, _, _ = deepscale.initialize(model=net_d, optimizer=torch.optim.SGD(net_d.parameters(), lr=LR_D),
                                           config=cfg)
    real, _ = _batch(0, 2 * MICRO_BS)
    for micro in range(2):
        if micro == 1:
            net_d.zero_grad()
        engine.backward(engine(real[micro * MICRO_BS:(micro + 1) * MICRO_BS]).square().mean())
        engine.step()
    got = _params(net_d)
    engine.destroy()
    return got


def test_module_zero_grad_between_micro_steps_clears_like_pytorch():
    got = run_distributed(_zero_grad_between_micro_steps, 1, args=(0,))[0]
    _, net_d = _nets()
    real, _ = _batch(0, 2 * MICRO_BS)
    (net_d(real[MICRO_BS:]).square().mean() / 2).backward()  # the engine scales each micro-step by 1/gas
    torch.optim.SGD(net_d.parameters(), lr=LR_D).step()
    for name, ref in _params(net_d).items():
        assert torch.equal(got[name], ref), name


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = torch.nn.Linear(DATA, 1), torch.nn.Linear(DATA, 1)

    def forward(self, x, use_b: bool = False):
        out = self.a(x)
        return out + self.b(x) if use_b else out


def _foreign_then_own(stage: int):
    """A foreign backward reaches both heads and is not cleared; the engine's own backward
    reaches head ``a`` only. As in PyTorch both gradients are summed and head ``b`` steps on the
    foreign gradient alone."""
    import deepscale
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _TwoHeads()
    cfg = {"train_batch_size": MICRO_BS * world, "train_micro_batch_size_per_gpu": MICRO_BS,
           "steps_per_print": 1000, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 4}}
    engine, _, _, _ = deepscale.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR_D),
                                           config=cfg)
    real, _ = _batch(0, MICRO_BS * world)
    mine = real[rank * MICRO_BS:(rank + 1) * MICRO_BS]
    model(mine, use_b=True).square().mean().backward()  # foreign: left in param.grad
    engine.backward(engine(mine).mean())
    engine.step()
    got = _params(model)
    engine.destroy()
    return got


@pytest.mark.parametrize("world", [2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_foreign_gradient_left_uncleared_is_accumulated_like_pytorch(stage, world):
    model = _TwoHeads()
    real, _ = _batch(0, MICRO_BS * world)
    model(real, use_b=True).square().mean().backward()
    model(real).mean().backward()
    torch.optim.SGD(model.parameters(), lr=LR_D).step()
    want = _params(model)
    for got in run_distributed(_foreign_then_own, world, args=(stage,)):
        for name, ref in want.items():
            torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
