"""The expert-parallel layer without an engine (plain torch.distributed, groups made on the first
forward) matches the full layer token for token, including a rank that routes no token at all."""
import pytest
import torch

from dist_harness import run_distributed


def _body(ep_size, k, drop_tokens):
    import torch.distributed as dist
    from deepscale.comm.expert_groups import clear_expert_groups
    from moe._moe_models import HIDDEN, MoENet, local_state, reference_state
    clear_expert_groups()
    rank = dist.get_rank()
    kwargs = dict(k=k, drop_tokens=drop_tokens, capacity_factor=1.0)
    full = MoENet(**kwargs)
    full.load_state_dict(reference_state(**kwargs))
    mine = MoENet(ep_size=ep_size, **kwargs)
    mine.load_state_dict(local_state(reference_state(**kwargs), ep_size, rank % ep_size))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(5 + rank, HIDDEN, generator=gen)  # uneven token counts per rank
    used = torch.ones(x.shape[0]) if rank != 1 else torch.zeros(x.shape[0])  # rank 1 routes nothing
    results = []
    for layer in (full.moe, mine.moe):
        inp = x.clone().requires_grad_()
        out, l_aux, counts = layer(inp, used_token=used)
        (out.pow(2).sum() + l_aux).backward()
        results.append((out.detach(), inp.grad, counts))
    (ref_out, ref_grad, ref_counts), (out, grad, counts) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, ref_counts)
    return counts.sum().item()


@pytest.mark.parametrize("ep_size, k, drop_tokens", [(2, 1, True), (4, 2, False), (4, 3, True)])
def test_expert_parallel_layer_matches_full_layer(ep_size, k, drop_tokens):
    totals = run_distributed(_body, 4, args=(ep_size, k, drop_tokens))
    assert totals[1] == 0 and all(t > 0 for r, t in enumerate(totals) if r != 1)
