"""The parallel grid as an mpu, its groups, the TP RNG streams and config-driven grid building."""
import pytest
import torch

from dist_harness import run_distributed


def _grid_body():
    import torch.distributed as dist
    from deepscale.parallel import build_parallel_grid, get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from deepscale.parallel import reset_parallel_grid
    from deepscale.utils import groups
    reset_parallel_grid()
    grid = build_parallel_grid(tp=2, sp=1)
    rank = dist.get_rank()
    assert groups._get_model_parallel_world_size() == 2 and groups._get_data_parallel_world_size() == 2
    coords = (grid.get_model_parallel_rank(), grid.get_data_parallel_rank())
    assert coords == (rank % 2, rank // 2)  # tensor-parallel peers are neighbours
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=grid.get_model_parallel_group())
    assert t.item() == (0 + 1 if rank < 2 else 2 + 3)
    model_parallel_cuda_manual_seed(1234)
    outside = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    both = [torch.empty(6) for _ in range(4)]
    dist.all_gather(both, torch.cat([outside, inside]))
    reset_parallel_grid()
    return [b.tolist() for b in both]


def test_grid_groups_and_rng_streams():
    gathered = run_distributed(_grid_body, 4)[0]
    outside = [g[:3] for g in gathered]
    inside = [g[3:] for g in gathered]
    assert all(o == outside[0] for o in outside)  # default stream: same everywhere (replicated dropout)
    assert inside[0] != inside[1]  # model-parallel stream differs between tensor-parallel ranks
    assert inside[0] == inside[2] and inside[1] == inside[3]  # and matches across data-parallel replicas


def _bad_degree_body():
    from deepscale.runtime.model_parallel_setup import grid_for_config
    with pytest.raises(ValueError, match="not divisible"):
        grid_for_config({"tensor_parallel": {"autotp_size": 3}})
    with pytest.raises(ValueError, match="disagree"):
        grid_for_config({"tensor_parallel": {"autotp_size": 2, "tp": {"tp_size": 4}}})


def test_config_degree_errors():
    run_distributed(_bad_degree_body, 2)


def _unshardable_body():
    from deepscale.parallel import apply_autotp

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wqkv_fused_odd = torch.nn.Linear(8, 24)
            self.out = torch.nn.Linear(8, 8)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

    with pytest.raises(ValueError, match=r"cannot shard attention module 'attn' \(Attention\)"):
        apply_autotp(Net())

    from deepscale.parallel.heads import plan_heads
    with pytest.raises(ValueError, match="layer.3.attn"):
        plan_heads(4, 4, 8, "layer.3.attn")
    with pytest.raises(ValueError, match="multiple"):
        plan_heads(6, 3, 2 * 2 * 2, "x")


def test_unshardable_models_name_the_module():
    run_distributed(_unshardable_body, 2)


def _input_check_body():
    import os
    import torch.distributed as dist
    import deepscale
    from deepscale.parallel import reset_parallel_grid
    from _tp_models import build_example_gpt
    reset_parallel_grid()
    os.environ["DEEPSCALE_TP_DEBUG"] = "1"
    try:
        engine, *_ = deepscale.initialize(model=build_example_gpt(), config={
            "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
            "tensor_parallel": {"autotp_size": 2}})
    finally:
        del os.environ["DEEPSCALE_TP_DEBUG"]
    same = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    engine((same, same))  # identical batches pass
    wrong = same + dist.get_rank()  # a loader sharded by global rank
    with pytest.raises(ValueError, match="tensor-parallel ranks \\[1\\].*same batch"):
        engine((wrong, wrong))
    engine.destroy()
    reset_parallel_grid()


def test_debug_mode_checks_tp_ranks_get_the_same_batch():
    run_distributed(_input_check_body, 2)
