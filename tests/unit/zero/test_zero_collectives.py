"""Every reduce-scatter / all-gather method gives the same chunks; method choice per backend."""
import pytest
import torch

from dist_harness import run_distributed


def _all_methods(world):
    import torch.distributed as dist
    from deepscale.runtime.zero.collectives import (GATHER_METHODS, REDUCE_METHODS, all_gather_flat,
                                                    reduce_scatter_flat)
    rank, out = dist.get_rank(), {}
    for method in REDUCE_METHODS:
        flat = torch.arange(8 * world, dtype=torch.float32) * (rank + 1)
        handles, result = reduce_scatter_flat(flat, rank, world, None, method)
        for handle in handles:
            handle.wait()
        out[method] = result.clone()
    for method in GATHER_METHODS:
        flat = torch.zeros(8 * world)
        flat[rank * 8:(rank + 1) * 8] = rank + 1.0
        for handle in all_gather_flat(flat, rank, world, None, method):
            handle.wait()
        out[method] = flat.clone()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_methods_agree(world):
    scale = sum(range(1, world + 1))
    for rank, out in enumerate(run_distributed(_all_methods, world, args=(world,))):
        want_chunk = torch.arange(rank * 8, (rank + 1) * 8, dtype=torch.float32) * scale
        for method in ("reduce_scatter", "all_reduce", "reduce"):
            assert torch.equal(out[method], want_chunk), method
        want_full = torch.arange(1, world + 1, dtype=torch.float32).repeat_interleave(8)
        for method in ("all_gather", "broadcast"):
            assert torch.equal(out[method], want_full), method


def test_pick_methods():
    from deepscale.runtime.zero.collectives import pick_methods
    assert pick_methods("gloo", True, True) == ("reduce", "broadcast")
    assert pick_methods("nccl", True, True) == ("reduce_scatter", "all_gather")
    assert pick_methods("nccl", False, False) == ("all_reduce", "broadcast")
    from deepscale.runtime.zero.collectives import reduce_scatter_flat
    with pytest.raises(ValueError, match="reduce method"):
        reduce_scatter_flat(torch.zeros(4), 0, 2, None, "bogus")
