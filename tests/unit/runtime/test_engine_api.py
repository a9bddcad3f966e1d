"""The Engine's public surface: initialize() arguments, accessors, loader, no_sync, errors."""
import argparse
import json

import pytest
import torch
from torch.utils.data import TensorDataset

import deepscale
from dist_harness import run_distributed
from engine_test_models import IN_DIM, OUT_DIM, base_config, make_model


def _dataset(n=24):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, IN_DIM, generator=gen), torch.randn(n, OUT_DIM, generator=gen))


def test_initialize_returns_four_and_trains_from_config_file(tmp_path):
    cfg_path = tmp_path / "ds_config.json"
    cfg = base_config(4, 2, 1, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2}},
                      gradient_clipping=1.0)
    cfg_path.write_text(json.dumps(cfg))
    args = argparse.Namespace(deepspeed_config=str(cfg_path), local_rank=0)
    engine, optimizer, loader, scheduler = deepscale.initialize(args=args, model=make_model(),
                                                                training_data=_dataset())
    assert isinstance(engine, deepscale.DeepScaleEngine)
    assert type(optimizer).__name__ in ("DeepScaleCPUAdam", "AdamW")  # compiled where its op builds
    assert scheduler is not None and engine.lr_scheduler is scheduler
    assert len(loader) == 6  # 24 samples / micro-batch 4
    for x, y in loader:
        engine.backward(engine(x, y))
        engine.step()
    assert engine.global_steps == 3 and engine.micro_steps == 6 and engine.global_samples == 24
    assert engine.train_batch_size() == 8 and engine.gradient_accumulation_steps() == 2
    assert engine.train_micro_batch_size_per_gpu() == 4
    assert engine.get_global_grad_norm() > 0
    assert engine.get_lr()[0] > 0 and not engine.fp16_enabled() and not engine.bfloat16_enabled()
    assert engine.zero_optimization_stage() == 0 and engine.device == torch.device("cpu")
    engine.destroy()


def test_model_is_required():
    with pytest.raises(ValueError, match="model is required"):
        deepscale.initialize(config=base_config())


def test_client_optimizer_and_scheduler_callables_win_over_config():
    cfg = base_config(scheduler={"type": "WarmupLR", "params": {}})
    engine, optimizer, _, scheduler = deepscale.initialize(
        model=make_model(), config=cfg, optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    assert isinstance(optimizer, torch.optim.SGD)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    x, y = _dataset(2).tensors
    engine.backward(engine(x, y))
    engine.step()
    assert engine.get_lr() == [0.25]
    engine.destroy()


def test_client_optimizer_instance_under_bf16_gets_fp32_masters():
    model = make_model()
    client = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine, optimizer, _, _ = deepscale.initialize(model=model, optimizer=client,
                                                   config=base_config(bf16={"enabled": True}))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert optimizer.optimizer is client
    assert all(p.dtype == torch.float32 for g in client.param_groups for p in g["params"])
    x, y = _dataset(2).tensors
    engine.backward(engine(x, y))  # fp32 inputs are cast to bf16 for the model
    engine.step()
    assert engine.global_steps == 1
    engine.destroy()


def test_gradient_accumulation_boundary_and_no_sync():
    engine, *_ = deepscale.initialize(model=make_model(), config=base_config(2, 3, 1))
    x, y = _dataset(2).tensors
    before = [p.detach().clone() for p in engine.module.parameters()]
    flags = []
    for _ in range(3):
        flags.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(x, y))
        engine.step()
    assert flags == [False, False, True]
    assert engine.global_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    with engine.no_sync():
        engine.backward(engine(x, y))
        with pytest.raises(RuntimeError, match="no_sync"):
            engine.step()
    engine.destroy()


def test_backward_rejects_bad_loss():
    engine, *_ = deepscale.initialize(model=make_model(), config=base_config())
    with pytest.raises(TypeError, match="scalar loss"):
        engine.backward(torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="does not require grad"):
        engine.backward(torch.tensor(1.0))
    engine.destroy()


def _loader_shards(world_size):
    import torch.distributed as dist
    engine, _, loader, _ = deepscale.initialize(model=make_model(), training_data=_dataset(16),
                                                config=base_config(2, 1, world_size))
    seen = [x[:, 0].tolist() for x, _ in loader]
    again = [x[:, 0].tolist() for x, _ in loader]
    return dist.get_rank(), seen, again


def test_loader_shards_disjointly_and_reshuffles_each_pass():
    results = run_distributed(_loader_shards, 2, args=(2,))
    firsts = [sum(seen, []) for _, seen, _ in results]
    assert len(firsts[0]) == len(firsts[1]) == 8
    assert not set(firsts[0]) & set(firsts[1])  # each sample on exactly one rank
    assert sorted(firsts[0] + firsts[1]) == sorted(_dataset(16).tensors[0][:, 0].tolist())
    assert results[0][1] != results[0][2]  # a new epoch reshuffles


def _broadcast_initial(world_size):
    import torch.distributed as dist
    torch.manual_seed(dist.get_rank())  # different init on every rank
    model = make_model(seed=dist.get_rank())
    engine, *_ = deepscale.initialize(model=model, config=base_config(2, 1, world_size))
    return [p.detach().clone() for p in engine.module.parameters()]


def test_rank0_weights_are_broadcast():
    results = run_distributed(_broadcast_initial, 2, args=(2,))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[0][0], make_model(seed=0).layers[0].weight.detach())


def test_add_config_arguments_both_spellings():
    parser = deepscale.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "a.json"])
    assert args.deepscale_config == "a.json" and args.deepspeed_config == "a.json"
    args = parser.parse_args(["--deepscale_config", "b.json"])
    assert args.deepspeed_config == "b.json"


def test_drop_in_module_paths():
    from deepscale.accelerator import get_accelerator
    from deepscale.runtime.lr_schedules import WarmupLR  # noqa: F401
    from deepscale.runtime.utils import set_random_seed
    from deepscale.utils import RepeatingLoader, log_dist, logger  # noqa: F401
    assert get_accelerator().communication_backend_name() in ("gloo", "nccl")
    set_random_seed(3)
    a = torch.rand(2)
    set_random_seed(3)
    assert torch.equal(a, torch.rand(2))
    assert deepscale.comm.get_world_size() >= 1
    loader = RepeatingLoader([1, 2])
    assert [next(loader) for _ in range(5)] == [1, 2, 1, 2, 1]
