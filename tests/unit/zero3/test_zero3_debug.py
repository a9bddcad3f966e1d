"""No hidden hangs: the sequence check names diverging modules, the watchdog reports long waits,
and a parameter used outside the modules that gather it gets a clear error."""
import time

import pytest
import torch

from dist_harness import run_distributed
from _zero3_helpers import STAGE3_SMALL, build_gpt_engine
from _zero3_models import gpt_rank_batch, make_gpt


class Branchy(torch.nn.Module):
    """Takes branch ``a`` or ``b`` (equal shapes) depending on an input flag."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(8, 8)
        self.branch_a = torch.nn.Linear(8, 8)
        self.branch_b = torch.nn.Linear(8, 8)

    def forward(self, x, use_a: bool):
        h = self.stem(x)
        return (self.branch_a(h) if use_a else self.branch_b(h)).pow(2).mean()


def _desync(world):
    import os
    import torch.distributed as dist
    import deepscale
    os.environ["DEEPSCALE_ZERO3_DEBUG"] = "1"
    try:
        torch.manual_seed(0)
        model = Branchy()
        cfg = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
               "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                     "reduce_bucket_size": 1}}
        engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        x = torch.randn(1, 8)
        loss = engine(x, use_a=True)  # same branch everywhere: fine
        engine.backward(loss)
        engine.step()
        try:
            engine(x, use_a=dist.get_rank() == 0)  # rank 0 takes branch_a, the others branch_b
        except RuntimeError as error:
            return type(error).__name__, str(error)
        finally:
            engine.destroy()
        return None, "no error"
    finally:
        del os.environ["DEEPSCALE_ZERO3_DEBUG"]


def test_ranks_taking_different_branches_get_a_desync_error_naming_the_modules():
    # Rank 0 had its branch prefetched from the recorded order and finishes its forward; rank 1
    # is about to gather branch_b: the end-of-forward check catches it instead of a hang.
    for name, message in run_distributed(_desync, 2, args=(2,)):
        assert name == "CollectiveDesyncError", message
        assert "rank 0: end of forward (last module: branch_a)" in message, message
        assert "rank 1: all_gather of parameter group" in message and "branch_b.weight" in message, message


class _SlowWork:
    def __init__(self, seconds):
        self.seconds = seconds

    def wait(self):
        time.sleep(self.seconds)
        return True


def test_watchdog_reports_a_collective_that_waits_too_long():
    from deepscale.runtime.zero.stage3.collectives import CollectiveRunner
    from deepscale.runtime.zero.stage3.sequence_check import CollectiveInfo
    from deepscale.runtime.zero.stage3.watchdog import Watchdog
    watchdog = Watchdog(timeout_s=0.2, rank=3, poll_s=0.05)
    runner = CollectiveRunner(group=None, world_size=2, watchdog=watchdog)
    runner.step = 7
    info = CollectiveInfo("all_gather", 5, "blocks.1.attn", "blocks.1.attn.qkv.weight", 768, step=7)
    runner.wait(_SlowWork(0.6), info)
    runner.wait(_SlowWork(0.0), CollectiveInfo("reduce_scatter", 6, "quick", "quick.weight", 4))
    watchdog.close()
    assert len(watchdog.reports) == 1
    report = watchdog.reports[0]
    for part in ("rank 3", "all_gather of parameter group 5", "blocks.1.attn", "blocks.1.attn.qkv.weight", "step 7"):
        assert part in report


def test_watchdog_can_be_disabled():
    from deepscale.runtime.zero.stage3.watchdog import Watchdog
    watchdog = Watchdog(timeout_s=0)
    with watchdog.watch("anything"):
        time.sleep(0.05)
    assert not watchdog.enabled and watchdog._thread is None and watchdog.reports == []


def _unregistered_external(world):
    engine = build_gpt_engine(3, world, model_kwargs={"register_external": False}, **STAGE3_SMALL)
    idx, tgt = gpt_rank_batch(0, 0, 0, 2, 1, world)
    try:
        engine(idx, tgt)
    except RuntimeError as error:
        return type(error).__name__, str(error)
    finally:
        engine.destroy()
    return None, "no error"


def test_unregistered_external_parameter_gets_an_error_telling_how_to_register_it():
    name, message = run_distributed(_unregistered_external, 1, args=(1,))[0]
    assert name == "ExternalParameterError", message
    assert "'wpe.weight'" in message and "'<root>'" in message
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
        "stage": 3, "stage3_debug_sequence_check": True, "stage3_watchdog_timeout": 5,
        "stage3_prefetch_bucket_size": 123, "stage3_max_live_parameters": 456}})
    kwargs = stage3_optimizer_kwargs(cfg)
    assert kwargs["debug"] is True and kwargs["watchdog_timeout_s"] == 5.0
    assert kwargs["prefetch_numel"] == 123 and kwargs["max_live_numel"] == 456
