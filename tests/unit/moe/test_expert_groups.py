"""Expert-parallel and expert-data-parallel groups from the topology (4 gloo ranks)."""
import pytest

from dist_harness import run_distributed


def _layout_body(ep_size, data_before):
    from deepscale.comm.expert_groups import clear_expert_groups, create_expert_groups, get_expert_groups
    clear_expert_groups()
    groups = create_expert_groups(ep_size, data_before_expert=data_before)
    assert get_expert_groups(f"ep_size_{ep_size}") is groups
    assert create_expert_groups(ep_size, data_before_expert=data_before) is groups  # created once
    return groups.ep_ranks, groups.edp_ranks, groups.ep_rank, groups.edp_rank


@pytest.mark.parametrize("ep_size, data_before, ep, edp", [
    (2, False, [[0, 1], [0, 1], [2, 3], [2, 3]], [[0, 2], [1, 3], [0, 2], [1, 3]]),
    (2, True, [[0, 2], [1, 3], [0, 2], [1, 3]], [[0, 1], [0, 1], [2, 3], [2, 3]]),
    (4, False, [[0, 1, 2, 3]] * 4, [[0], [1], [2], [3]]),
    (1, False, [[0], [1], [2], [3]], [[0, 1, 2, 3]] * 4),
])
def test_group_layouts(ep_size, data_before, ep, edp):
    results = run_distributed(_layout_body, 4, args=(ep_size, data_before))
    assert [r[0] for r in results] == ep
    assert [r[1] for r in results] == edp
    for rank, (ep_ranks, edp_ranks, ep_rank, edp_rank) in enumerate(results):
        assert ep_ranks[ep_rank] == rank and edp_ranks[edp_rank] == rank


def _parity_data_before_body():
    from moe.test_moe_parity import NUM_STEPS
    import torch.distributed as dist
    from moe._moe_models import batch, build_engine, reference_run
    ref_losses, _ = reference_run(NUM_STEPS, 4)
    engine = build_engine(2, 2, extra_config={"use_data_before_expert_parallelism": True})
    errs = []
    for step in range(NUM_STEPS):
        loss = engine(*batch(step, dist.get_rank()))
        engine.backward(loss)
        engine.step()
        errs.append(abs(float(loss) - ref_losses[step][dist.get_rank()]) / abs(ref_losses[step][dist.get_rank()]))
    engine.destroy()
    return max(errs)


def test_use_data_before_expert_parallelism_trains_like_the_reference():
    assert max(run_distributed(_parity_data_before_body, 4, timeout=120)) < 1e-6


def test_ep_size_must_divide_the_data_parallel_size():
    def_body = _bad_ep_body
    with pytest.raises(Exception, match="must divide"):
        run_distributed(def_body, 4)


def _bad_ep_body():
    from deepscale.comm.expert_groups import create_expert_groups
    create_expert_groups(3)


def test_single_process_groups_without_torch_distributed():
    from deepscale.comm.expert_groups import create_expert_groups
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    groups = create_expert_groups(1)
    assert (groups.ep_size, groups.edp_size, groups.ep_rank) == (1, 1, 0)
    with pytest.raises(ValueError, match="ep_size=2"):
        create_expert_groups(2)


def _deepspeed_names_body():
    from deepscale.comm.expert_groups import clear_expert_groups
    from deepscale.utils import groups
    clear_expert_groups()
    groups._create_expert_and_data_parallel(2)
    name = "ep_size_2"
    import torch.distributed as dist
    return (groups._get_expert_parallel_world_size(name), groups._get_expert_data_parallel_world_size(name),
            groups._get_expert_parallel_rank(name), groups._get_expert_data_parallel_rank(name),
            dist.get_process_group_ranks(groups._get_expert_parallel_group(name)),
            sorted(groups._get_expert_parallel_group_dict()), groups._get_max_expert_size())


def test_deepspeed_group_accessors():
    results = run_distributed(_deepspeed_names_body, 4)
    for rank, (ep, edp, ep_rank, edp_rank, ep_ranks, names, max_size) in enumerate(results):
        assert (ep, edp, ep_rank, edp_rank) == (2, 2, rank % 2, rank // 2)
        assert ep_ranks == [rank - rank % 2, rank - rank % 2 + 1]
        assert names == ["ep_size_2"] and max_size == 2
