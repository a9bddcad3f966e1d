"""A submodule that returns its tensors inside a plain object (not a tuple/list/dict).

Its output cannot be hooked, so the module's groups are not re-gathered before its backward;
autograd's saved views of its weights must then keep their values. Stage 3 must match stage 0
(fp32, 1e-5 relative) instead of silently using released (zeroed) weights.
"""
import torch

from dist_harness import run_distributed

STEPS, WIDTH = 4, 24


class Boxed:
    """A plain container pytree cannot see into."""

    def __init__(self, value):
        self.value = value


class BoxingLinear(torch.nn.Module):
    """Owns its weight (so its own hooks gather it) and returns a :class:`Boxed`."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width, width) / width ** 0.5)

    def forward(self, x):
        return Boxed(torch.tanh(torch.nn.functional.linear(x, self.weight)))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(WIDTH, WIDTH)
        self.boxed = BoxingLinear(WIDTH)
        self.last = torch.nn.Linear(WIDTH, 1)

    def forward(self, x, y):
        hidden = self.boxed(torch.relu(self.first(x))).value
        return torch.nn.functional.mse_loss(self.last(hidden).squeeze(-1), y)


def _train(world):
    import deepscale
    import deepscale.zero
    import torch.distributed as dist
    out = {}
    for stage in (0, 3):
        torch.manual_seed(0)
        model = Net()
        cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 10,
                                     "reduce_bucket_size": 100}}
        engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        gen = torch.Generator().manual_seed(1 + dist.get_rank())
        losses = []
        for _ in range(STEPS):
            x, y = torch.randn(4, WIDTH, generator=gen), torch.randn(4, generator=gen)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        with deepscale.zero.GatheredParameters(list(engine.module.parameters())):
            out[stage] = (losses, {n: p.detach().clone() for n, p in engine.module.named_parameters()})
        engine.destroy()
    return out


def test_module_returning_a_plain_object_trains_like_stage0():
    for per_rank in run_distributed(_train, 2, args=(2,)):
        losses0, params0 = per_rank[0]
        losses3, params3 = per_rank[3]
        torch.testing.assert_close(torch.tensor(losses3), torch.tensor(losses0), rtol=1e-5, atol=1e-6)
        for name, want in params0.items():
            rel = ((params3[name] - want).norm() / want.norm()).item()
            assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
        assert max((params0[n] - params3[n]).abs().max().item() for n in params0) < 1e-4
