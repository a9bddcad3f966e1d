"""zero.Init, GatheredParameters, the ds_* attributes and the memory bounds of ZeRO stage 3."""
import torch

from dist_harness import run_distributed
from _zero3_helpers import (MICRO_BS, STAGE3_SMALL, build_gpt_engine, full_params, gpt_reference, train_gpt,
                            trim_heap as _trim_heap)
from _zero3_models import make_gpt


def _init_attributes_and_gather(world):
    import deepscale.zero
    from deepscale.runtime.zero.partition_parameters import ZeroParamStatus
    with deepscale.zero.Init():
        model = make_gpt()
    whole = make_gpt()  # same seed, not partitioned
    out = {"statuses": set(), "shapes_ok": True, "shard_ok": True, "empty_ok": True}
    for (name, param), (_, ref) in zip(model.named_parameters(), whole.named_parameters()):
        out["statuses"].add(param.ds_status)
        out["shapes_ok"] &= tuple(param.ds_shape) == tuple(ref.shape) and param.ds_numel == ref.numel()
        out["shard_ok"] &= param.ds_tensor.numel() == -(-ref.numel() // world)
        out["empty_ok"] &= param.numel() == 0
    with deepscale.zero.GatheredParameters(model.parameters()):
        out["gathered_equal"] = all(torch.equal(p, r) for p, r in zip(model.parameters(), whole.parameters()))
        out["available"] = all(p.ds_status == ZeroParamStatus.AVAILABLE for p in model.parameters())
    out["released"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in model.parameters())
    import torch.distributed as dist
    with deepscale.zero.GatheredParameters(model.shared.weight, modifier_rank=1):
        model.shared.weight.data.fill_(float(dist.get_rank() + 1))  # only rank 1's change is kept
    with deepscale.zero.GatheredParameters(model.shared.weight):
        out["modified"] = model.shared.weight.detach().clone()
        model.shared.weight.data.zero_()  # no modifier: discarded
    with deepscale.zero.GatheredParameters([model.shared.weight]):
        out["discarded"] = bool((model.shared.weight == 2.0).all())
    out["tied"] = model.lm_head.weight is model.wte.weight
    return out


def test_init_partitions_at_construction_and_gathered_parameters_round_trip():
    from deepscale.runtime.zero.partition_parameters import ZeroParamStatus
    for result in run_distributed(_init_attributes_and_gather, 2, args=(2,)):
        assert result["statuses"] == {ZeroParamStatus.NOT_AVAILABLE}
        assert result["shapes_ok"] and result["shard_ok"] and result["empty_ok"]
        assert result["gathered_equal"] and result["available"] and result["released"]
        assert torch.equal(result["modified"], torch.full_like(result["modified"], 2.0))
        assert result["discarded"] and result["tied"]


def _init_model_trains_like_reference(world):
    import deepscale.zero
    with deepscale.zero.Init():
        model = make_gpt()
    engine = build_gpt_engine(3, world, model=model, **STAGE3_SMALL)
    losses = train_gpt(engine, world, range(6))
    params = full_params(engine)
    engine.destroy()
    return losses, params


def test_model_built_under_init_trains_like_the_reference():
    ref_losses, ref_params = gpt_reference(6, MICRO_BS * 2)
    for losses, params in run_distributed(_init_model_trains_like_reference, 2, args=(2,)):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        for name, want in ref_params.items():
            assert ((params[name] - want).norm() / want.norm()).item() < 1e-5, name


def _param_bytes(model):
    held = 0
    for param in model.parameters():
        held += param.ds_tensor.numel() * param.ds_tensor.element_size() + param.numel() * param.element_size()
    return held


def _memory_bounds(world, max_live):
    from deepscale.runtime.zero.stage3.zero_param import shard_numel
    limits = dict(STAGE3_SMALL, stage3_max_live_parameters=max_live, stage3_max_reuse_distance=10**9,
                  stage3_prefetch_bucket_size=2000)
    engine = build_gpt_engine(3, world, **limits)
    train_gpt(engine, world, range(3))
    opt = engine._train_opt
    persistent = sum(p.ds_numel * 4 for p in engine.module.parameters() if p.ds_persist)
    expected = sum(shard_numel(p.ds_numel, world) * 4 for p in engine.module.parameters())
    largest_group = max(g.numel for g in opt.groups if not g.persistent)
    result = dict(held=_param_bytes(engine.module), expected=expected, persistent=persistent,
                  peak=opt.coordinator.peak_live_numel, largest=largest_group,
                  total=sum(p.ds_numel for p in engine.module.parameters()))
    engine.destroy()
    return result


def test_params_held_outside_forward_are_one_nth_and_live_gathers_are_bounded():
    bounded = run_distributed(_memory_bounds, 2, args=(2, 3000))
    unbounded = run_distributed(_memory_bounds, 2, args=(2, 10**9))
    for result, free in zip(bounded, unbounded):
        # Outside a forward: the 1/N shards (padding at most one element per parameter and
        # rank) plus the whole persistent parameters.
        assert result["held"] == result["expected"] + result["persistent"]
        assert result["expected"] <= result["total"] * 4 / 2 + 4 * 40
        # Prefetch and reuse keep more gathered when allowed; the limit bounds the peak.
        assert free["peak"] > 3000 >= result["peak"] >= result["largest"], (result, free)


def _rss_bytes() -> int:
    import os
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")




def _build_big_under_limit(world, limit_fraction):
    import deepscale.zero
    kwargs = dict(layers=8, dim=256)
    with torch.device("meta"):
        full_bytes = sum(p.numel() * 4 for p in make_gpt(**kwargs).parameters())
    limit = int(full_bytes * limit_fraction)
    _trim_heap()
    before = _rss_bytes()
    with deepscale.zero.Init():
        model = make_gpt(**kwargs)
    _trim_heap()
    grown = _rss_bytes() - before
    held = _param_bytes(model)
    engine = build_gpt_engine(3, world, model=model, stage3_param_persistence_threshold=0,
                              stage3_max_live_parameters=full_bytes // 4 // 4, stage3_prefetch_bucket_size=400_000,
                              reduce_bucket_size=200_000)
    losses = train_gpt(engine, world, range(2))
    opt = engine._train_opt
    trained_held = sum(g.shard_numel * 4 for g in opt.groups) + opt.coordinator.peak_live_numel * 4
    engine.destroy()
    return dict(full=full_bytes, limit=limit, grown=grown, held=held, trained_held=trained_held, losses=losses)


def test_model_larger_than_the_per_process_limit_is_built_under_init_and_trains():
    for result in run_distributed(_build_big_under_limit, 2, args=(2, 0.8)):
        # The whole model would not fit under the limit; its partitioned form does, during
        # construction (resident memory actually grown) and during training (shards plus the
        # most parameters ever gathered at once).
        assert result["full"] > result["limit"]
        assert result["held"] <= result["full"] / 2 + 4 * 64
        assert result["grown"] < result["limit"], result
        assert result["trained_held"] < result["limit"], result
        assert all(loss == loss for loss in result["losses"]) and result["losses"][1] < result["losses"][0] + 1.0
