"""Partition math (buckets, padding, fragments) and ZeRO construction errors."""
import pytest
import torch

from deepscale.runtime.zero.partition import (order_buckets, padded_numel, padding_elements, plan_group_buckets,
                                              split_into_buckets)


def test_padded_numel_is_a_multiple_of_world_times_align():
    assert padded_numel(10, 4, align=4) == 16
    assert padded_numel(16, 4, align=4) == 16
    assert padded_numel(0, 2, align=4) == 8
    assert padded_numel(7, 1, align=1) == 7
    with pytest.raises(ValueError, match="world_size"):
        padded_numel(5, 0)


def test_split_into_buckets_closes_at_the_target_size():
    assert split_into_buckets([5, 5, 5, 20, 1], 10) == [[0, 1], [2, 3], [4]]
    assert split_into_buckets([100], 10) == [[0]]
    with pytest.raises(ValueError, match="reduce_bucket_size"):
        split_into_buckets([1], 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fragments_cover_every_parameter_exactly_once(world):
    numels = [7, 64, 3, 129, 1, 40]
    plans = plan_group_buckets(0, numels, bucket_numel=50, world_size=world)
    seen = {i: torch.zeros(n, dtype=torch.int32) for i, n in enumerate(numels)}
    for plan in plans:
        assert plan.padded == plan.chunk * world and plan.chunk % 4 == 0 and plan.padded >= plan.numel
        assert plan.param_indices == sorted(plan.param_indices, reverse=True)  # backward order
        for rank in range(world):
            used = 0
            for pos, index in enumerate(plan.param_indices):
                frag = plan.fragment(rank, pos)
                if frag is not None:
                    assert 0 <= frag.chunk_offset and frag.chunk_offset + frag.numel <= plan.chunk
                    assert plan.offsets[pos] + frag.param_start == rank * plan.chunk + frag.chunk_offset
                    seen[index][frag.param_start:frag.param_start + frag.numel] += 1
                    used += frag.numel
            assert used <= plan.chunk
    assert all(torch.all(count == 1) for count in seen.values())
    assert padding_elements(plans) == sum(p.padded for p in plans) - sum(numels)


def test_order_buckets_numbers_by_completion():
    plans = plan_group_buckets(0, [10, 10, 10], 10, 2) + plan_group_buckets(1, [5], 10, 2)
    ordered = order_buckets(plans, [3, 1, 0, 2])
    assert [p.index for p in ordered] == [0, 1, 2, 3]
    assert ordered[0] is plans[2] and ordered[3] is plans[0]


def _engine(cfg_extra=None, optimizer=None):
    import deepscale
    from engine_test_models import make_model
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}
    cfg.update(cfg_extra or {})
    model = make_model()
    opt = optimizer(model.parameters()) if optimizer else None
    return deepscale.initialize(model=model, optimizer=opt, config=cfg)[0]


class _Custom(torch.optim.SGD):
    pass


def test_zero_needs_an_optimizer():
    with pytest.raises(ValueError, match="needs an optimizer"):
        _engine()


def test_untested_optimizer_needs_the_config_switch():
    with pytest.raises(ValueError, match="zero_allow_untested_optimizer"):
        _engine(optimizer=lambda params: _Custom(params, lr=0.1))
    engine = _engine({"zero_allow_untested_optimizer": True}, optimizer=lambda params: _Custom(params, lr=0.1))
    assert engine.zero_optimization_stage() == 2
    assert engine.optimizer.param_groups[0]["lr"] == 0.1
    engine.destroy()


def test_unused_parameter_is_an_error_when_not_ignored():
    import deepscale
    from engine_test_models import TinyNet
    torch.manual_seed(0)
    model = TinyNet(unused=True)
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 1, "ignore_unused_parameters": False}}
    engine = deepscale.initialize(model=model, config=cfg)[0]
    x, y = torch.randn(2, 16), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="ignore_unused_parameters.*"):
        engine.backward(engine(x, y))
    engine.destroy()
