"""deepscale.comm: init reuses an existing group; wrappers match torch.distributed; topology."""
import pytest
import torch

from dist_harness import run_distributed
from deepscale.comm import ParallelTopology


def _collectives():
    import deepscale
    import deepscale.comm as dist
    deepscale.init_distributed()  # the harness already initialised: must be reused, not re-created
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    gathered = torch.zeros(world)
    dist.all_gather_into_tensor(gathered, torch.tensor([float(rank)]))
    scattered = torch.zeros(1)
    dist.reduce_scatter_tensor(scattered, torch.arange(world, dtype=torch.float32))
    b = torch.tensor([float(rank)])
    dist.broadcast(b, src=world - 1)
    a2a = torch.zeros(world)
    dist.all_to_all_single(a2a, torch.full((world,), float(rank)))
    if world > 1:
        if rank == 0:
            dist.send(torch.tensor([42.0]), dst=1)
        elif rank == 1:
            got = torch.zeros(1)
            dist.recv(got, src=0)
            assert got.item() == 42.0
    sub = dist.new_group(ranks=list(range(world)))
    dist.barrier(group=sub)
    return (t.item(), gathered.tolist(), scattered.item(), b.item(), a2a.tolist(), dist.get_local_rank(),
            dist.is_initialized())


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_collectives(world_size):
    results = run_distributed(_collectives, world_size)
    for rank, (total, gathered, scattered, bcast, a2a, local_rank, init) in enumerate(results):
        assert total == world_size * (world_size + 1) / 2
        assert gathered == [float(r) for r in range(world_size)]
        assert scattered == rank * world_size
        assert bcast == world_size - 1
        assert a2a == [float(r) for r in range(world_size)]
        assert local_rank == rank and init


def test_uninitialised_defaults():
    import deepscale.comm as dist
    if dist.is_initialized():
        pytest.skip("the default group is initialised in this process")
    assert dist.get_rank() == 0 and dist.get_world_size() == 1


def test_topology_layout():
    topo = ParallelTopology(pp=2, tp=2, world_size=8)
    assert topo.degrees["dp"] == 2
    assert topo.axis_groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.axis_groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.axis_groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.coord(5) == {"pp": 1, "dp": 0, "ep": 0, "sp": 0, "tp": 1}
    assert all(topo.rank(**topo.coord(r)) == r for r in range(8))
    assert topo.group_of("dp", 5) == [5, 7]


@pytest.mark.parametrize("kwargs,match", [({"pp": 3, "world_size": 8}, "not divisible"),
                                          ({"dp": 2, "tp": 2, "world_size": 8}, "does not equal"),
                                          ({"dp": 2, "tp": 0}, "tp must be"),
                                          ({"pp": 2}, "needs dp or world_size")])
def test_topology_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelTopology(**kwargs)


def _groups_body():
    import deepscale.comm as dist
    from deepscale.comm import ProcessGroups
    topo = ParallelTopology(tp=2, world_size=dist.get_world_size())
    groups = ProcessGroups(topo, axes=["dp", "tp", "pp"])
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=groups.group("tp"))
    p = torch.tensor([1.0])
    dist.all_reduce(p, group=groups.group("pp"))  # degree 1: only this rank
    return t.item(), p.item(), groups.axis_rank("dp"), groups.axis_rank("tp")


def test_process_groups_per_axis():
    results = run_distributed(_groups_body, 4)
    # tp groups are [0,1] and [2,3]: sums 1 and 5; dp coordinate is rank // 2.
    assert results == [(1.0, 1.0, 0, 0), (1.0, 1.0, 0, 1), (5.0, 1.0, 1, 0), (5.0, 1.0, 1, 1)]
