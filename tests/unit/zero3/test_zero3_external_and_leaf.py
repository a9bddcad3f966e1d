"""A parent reading a child's weight (``F.linear(x, self.linear1.weight)``) works without
registration, and a leaf module whose forward runs a data-dependent subset of its children
trains; both match stage 0 step by step (fp32, 2 ranks, 1e-6)."""
import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_distributed

NUM_STEPS = 4
SMALL_GROUPS = {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1}


class ParentReadsChildWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = torch.nn.Linear(16, 16)
        self.linear2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.linear1.weight, self.linear1.bias))  # linear1 itself never runs
        return self.linear2(h).pow(2).mean()


class Experts(torch.nn.Module):
    """Top-1 routing: each token goes to one expert; which experts run depends on the data."""

    def __init__(self, dim: int = 16, num_experts: int = 4):
        super().__init__()
        self.router = torch.nn.Linear(dim, num_experts)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(num_experts)])

    def forward(self, x):
        weights = self.router(x).softmax(-1)
        choice = weights.argmax(-1)
        out = torch.zeros_like(x)
        for index in choice.unique().tolist():
            rows = choice == index
            out[rows] = self.experts[index](x[rows]) * weights[rows, index:index + 1]
        return out


class MoENet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        self.moe = Experts()
        self.out = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.moe(torch.tanh(self.inp(x)))).pow(2).mean()


MODELS = {"external": ParentReadsChildWeight, "moe": MoENet}


def _train(world, model_name, stage, leaf):
    import torch.distributed as dist
    import deepscale
    import deepscale.zero
    from deepscale.utils import set_z3_leaf_modules
    torch.manual_seed(11)
    model = MODELS[model_name]()
    if leaf:
        set_z3_leaf_modules(model, [Experts])
    cfg = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
           "zero_optimization": {"stage": stage, **(SMALL_GROUPS if stage == 3 else {})}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    rank, losses, params = dist.get_rank(), [], []
    try:
        for step in range(NUM_STEPS):
            x = torch.randn(4 * world, 16, generator=torch.Generator().manual_seed(50 + step))[4 * rank:4 * rank + 4]
            loss = engine(x)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            with deepscale.zero.GatheredParameters(list(engine.module.parameters())):
                params.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
    except RuntimeError as error:
        return type(error).__name__, str(error)
    finally:
        engine.destroy()
    return losses, params


def _run(world, model_name, leaf):
    return {stage: _train(world, model_name, stage, leaf) for stage in (0, 3)}


@pytest.mark.parametrize("model_name", ["external", "moe"])
def test_zero3_matches_stage0(model_name):
    for rank, result in enumerate(run_distributed(_run, 2, args=(2, model_name, model_name == "moe"))):
        (losses0, params0), (losses3, params3) = result[0], result[3]
        assert not isinstance(losses3, str), params3  # an error name and message
        for step in range(NUM_STEPS):
            assert losses3[step] == pytest.approx(losses0[step], rel=1e-6, abs=1e-6), (rank, step, losses3, losses0)
            for name, want in params0[step].items():
                torch.testing.assert_close(params3[step][name], want, rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} {name}: {m}")


def _moe_without_leaf(world):
    return _train(world, "moe", 3, leaf=False)


def test_moe_without_leaf_mark_gets_the_desync_error():
    # the ranks route to different experts: the experts' own hooks would gather different groups
    for name, message in run_distributed(_moe_without_leaf, 2, args=(2,)):
        assert name == "CollectiveDesyncError", message
        assert "moe.experts." in message, message


def test_leaf_module_functions():
    from deepscale.utils import get_z3_leaf_modules, set_z3_leaf_modules, unset_z3_leaf_modules, z3_leaf_module
    model = MoENet()
    assert set_z3_leaf_modules(model, ["Experts"]) == [model.moe]
    assert get_z3_leaf_modules(model) == [model.moe] and z3_leaf_module(model.moe) and not z3_leaf_module(model)
    unset_z3_leaf_modules(model, [Experts])
    assert get_z3_leaf_modules(model) == []
    with pytest.raises(ValueError, match="no module"):
        set_z3_leaf_modules(model, [torch.nn.Conv2d])
    with pytest.raises(TypeError, match="nn.Module"):
        set_z3_leaf_modules(object(), [Experts])
