"""No hidden hangs: the always-on sequence check names diverging modules, and a parameter used
outside the modules that gather it gets a clear error (the watchdog: tests/unit/comm)."""
import time

import pytest
import torch

from dist_harness import run_distributed
from _zero3_models import make_gpt


class Branchy(torch.nn.Module):
    """Takes branch ``a`` or ``b`` (equal shapes unless ``big_b``) depending on an input flag;
    ``width`` 400 makes every weight larger than the default persistence threshold."""

    def __init__(self, big_b: bool = False, width: int = 8):
        super().__init__()
        self.stem = torch.nn.Linear(width, width)
        self.branch_a = torch.nn.Linear(width, width)
        self.branch_b = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)) \
            if big_b else torch.nn.Linear(width, width)

    def forward(self, x, use_a: bool):
        h = self.stem(x)
        return (self.branch_a(h) if use_a else self.branch_b(h)).pow(2).mean()


def _desync(world, big_b, width, zero_extra):
    """Default settings (no debug switch): one step on the same branch, then rank 0 takes
    branch_a and the others branch_b."""
    import torch.distributed as dist
    import deepscale
    torch.manual_seed(0)
    model = Branchy(big_b, width)
    cfg = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 3, **zero_extra}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(1, width)
    start = time.monotonic()
    try:
        for use_a in (True, dist.get_rank() == 0):
            loss = engine(x, use_a=use_a)
            engine.backward(loss)
            engine.step()
    except RuntimeError as error:
        return type(error).__name__, str(error), time.monotonic() - start
    finally:
        engine.destroy()
    return None, "no error", time.monotonic() - start


# Default settings with small branches (every parameter persistent: no gathers at all) and
# large ones (one group holds them all); one group per module with equal sizes (without the
# check the ranks would mix the two branches' weights) and with a larger branch_b (different
# sizes: without the check gloo hangs or dies with no Python traceback).
SMALL_GROUPS = {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1}
DESYNC_CASES = {"defaults_small": (False, 8, {}), "defaults_large": (True, 400, {}),
                "group_per_module": (False, 8, SMALL_GROUPS), "group_per_module_big_b": (True, 8, SMALL_GROUPS)}


@pytest.mark.parametrize("case", sorted(DESYNC_CASES))
def test_ranks_taking_different_branches_get_a_desync_error_naming_the_modules(case):
    big_b, width, zero_extra = DESYNC_CASES[case]
    for name, message, seconds in run_distributed(_desync, 2, args=(2, big_b, width, zero_extra)):
        assert name == "CollectiveDesyncError", message
        assert seconds < 30, seconds
        assert "rank 0:" in message and "rank 1:" in message, message
        assert "branch_a" in message and "branch_b" in message, message


class CapturedWeight(torch.nn.Module):
    """Reads a child's weight through a reference kept in a list: no attribute lookup to see."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 1)
        self.refs = [self.emb.weight]

    def forward(self, x):
        return self.head(torch.nn.functional.linear(x, self.refs[0])).mean()


def _captured_external(world):
    import deepscale
    torch.manual_seed(0)
    model = CapturedWeight()
    cfg = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    try:
        engine(torch.randn(1, 16))
    except RuntimeError as error:
        return type(error).__name__, str(error)
    finally:
        engine.destroy()
    return None, "no error"


def test_external_parameter_that_cannot_be_registered_automatically_gets_an_error():
    # (a parent reading ``self.child.weight`` is registered automatically: test_zero3_external_and_leaf)
    name, message = run_distributed(_captured_external, 1, args=(1,))[0]
    assert name == "ExternalParameterError", message
    assert "'emb.weight'" in message and "'<root>'" in message
    assert "deepscale.zero.register_external_parameter" in message


def test_register_external_parameter_rejects_wrong_types():
    import deepscale.zero
    model = make_gpt()
    with pytest.raises(TypeError, match="nn.Module"):
        deepscale.zero.register_external_parameter(object(), model.wpe.weight)
    with pytest.raises(TypeError, match="nn.Parameter"):
        deepscale.zero.register_external_parameter(model, torch.zeros(2))
    deepscale.zero.unregister_external_parameter(model, model.wpe.weight)
    with pytest.raises(ValueError, match="not registered"):
        deepscale.zero.unregister_external_parameter(model, model.wpe.weight)


def test_config_keys_reach_the_stage3_optimizer():
    from deepscale.config import DeepScaleConfig
    from deepscale.runtime.zero.stage3 import stage3_optimizer_kwargs
    cfg = DeepScaleConfig.from_dict({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_debug_sequence_check": True,
        "stage3_prefetch_bucket_size": 123, "stage3_max_live_parameters": 456}})
    kwargs = stage3_optimizer_kwargs(cfg)
    assert kwargs["debug"] is True
    assert kwargs["prefetch_numel"] == 123 and kwargs["max_live_numel"] == 456
