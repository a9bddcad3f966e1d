"""Ulysses DistributedAttention against whole-sequence attention on one process (fp32, rtol 1e-5, atol 1e-6).

Every rank computes the reference on the whole sequence, then the sequence-parallel result on
its slice; outputs and the gradients of q/k/v slices must match. Cases include a sequence the
degree does not divide, head counts it does not divide, and grouped-query key/value heads.
"""
import pytest
import torch

from dist_harness import run_distributed

RTOL, ATOL = 1e-5, 1e-6


def _sdpa(q, k, v, causal=True):
    # (seq, batch, heads, dim) -> SDPA's (batch, heads, seq, dim); key/value heads may be fewer.
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                           enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3)


def _slices(total, world):
    base, extra = divmod(total, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return sizes, starts


def _attention_body(seq, heads, kv_heads):
    import torch.distributed as dist
    from deepscale.sequence.layer import DistributedAttention
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(7)
    q = torch.randn(seq, 2, heads, 8, requires_grad=True)
    k = torch.randn(seq, 2, kv_heads, 8, requires_grad=True)
    v = torch.randn(seq, 2, kv_heads, 8, requires_grad=True)
    w = torch.randn(seq, 2, heads, 8)
    ref = _sdpa(q, k, v)
    (ref * w).sum().backward()
    sizes, starts = _slices(seq, world)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    lq, lk, lv = (t.detach()[lo:hi].clone().requires_grad_() for t in (q, k, v))
    attn = DistributedAttention(_sdpa, None, scatter_idx=2, gather_idx=0)
    out = attn(lq, lk, lv)
    (out * w[lo:hi]).sum().backward()
    for name, got, want in (("out", out, ref[lo:hi]), ("dq", lq.grad, q.grad[lo:hi]), ("dk", lk.grad, k.grad[lo:hi]),
                            ("dv", lv.grad, v.grad[lo:hi])):
        assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), f"{name}: max diff {(got - want).abs().max().item()}"
    return out.shape[0]


@pytest.mark.parametrize("world, seq, heads, kv_heads", [
    (2, 8, 4, 4),     # even
    (2, 7, 4, 4),     # sequence not divisible by sp
    (2, 8, 3, 3),     # heads not divisible by sp
    (2, 8, 4, 2),     # GQA, both divisible
    (4, 12, 4, 2),    # GQA with fewer kv heads than ranks: replicated
    (4, 10, 6, 2),    # uneven heads and GQA: expanded; uneven sequence
])
def test_distributed_attention_matches_whole_sequence(world, seq, heads, kv_heads):
    lengths = run_distributed(_attention_body, world, args=(seq, heads, kv_heads))
    assert sum(lengths) == seq


def _batch_first_body():
    import torch.distributed as dist
    from deepscale.sequence.layer import DistributedAttention
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 8, 4, 8) for _ in range(3))

    def local(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (a, b, c)), is_causal=True).transpose(1, 2)

    ref = local(q, k, v)
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    out = DistributedAttention(local, None, scatter_idx=2, gather_idx=1)(q[:, part], k[:, part], v[:, part])
    assert torch.allclose(out, ref[:, part], rtol=RTOL, atol=ATOL)


def test_batch_first_layout():
    run_distributed(_batch_first_body, 2)


def test_more_ranks_than_heads_is_a_clear_error():
    from deepscale.parallel.ulysses import plan_kv_heads
    with pytest.raises(ValueError, match="sequence_parallel_size 4 exceeds the 2 attention heads"):
        plan_kv_heads(2, 2, 4)
    assert plan_kv_heads(8, 2, 4) == ("replicate", [2, 2, 2, 2], [1, 1, 1, 1])
    assert plan_kv_heads(8, 4, 4) == ("split", [2, 2, 2, 2], [1, 1, 1, 1])
    assert plan_kv_heads(4, 1, 2)[0] == "replicate"
    assert plan_kv_heads(6, 2, 4)[0] == "expand"


def _loss_body():
    import torch.distributed as dist
    from deepscale.sequence.layer import sequence_parallel_loss
    rank = dist.get_rank()
    counts = [3, 5]
    local_sum = torch.tensor(float(10 * (rank + 1)), requires_grad=True)
    loss = sequence_parallel_loss(local_sum, counts[rank], None)
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / 2, local_sum.grad.item()


def test_token_weighted_loss():
    (mean0, g0), (mean1, g1) = run_distributed(_loss_body, 2)
    assert mean0 == pytest.approx((10 + 20) / 8) and mean1 == pytest.approx(mean0)
    assert g0 == pytest.approx(2 / 8) and g1 == pytest.approx(2 / 8)


STEPS, LR, MOMENTUM, CLIP = 5, 0.1, 0.9, 0.5


def _sp_train_body(sp, zero_stage, seq):
    import copy
    import torch.distributed as dist
    import deepscale
    from deepscale.parallel import build_parallel_grid, reset_parallel_grid
    from _tp_models import UlyssesGPT, batches, build_example_gpt
    reset_parallel_grid()
    world = dist.get_world_size()
    dp = world // sp
    grid = build_parallel_grid(sp=sp)
    dense = build_example_gpt()
    model = UlyssesGPT(copy.deepcopy(dense), grid.get_sequence_parallel_group())
    ref_opt = torch.optim.SGD(dense.parameters(), lr=LR, momentum=MOMENTUM)
    data = batches(STEPS, 2 * dp, seq)
    for ids in data:
        # Ignored labels: the token weighting must count only the others. Every row loses the same
        # number, so the data-parallel mean of per-shard means equals the reference's global mean.
        ids[:, :2] = -100
    ref_losses = []
    for ids in data:
        labels = ids.clone()
        loss = dense((ids.clamp(min=0), labels))
        ref_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense.parameters(), CLIP)
        ref_opt.step()
        ref_losses.append(loss.item())
    config = {"train_micro_batch_size_per_gpu": 2, "sequence_parallel_size": sp, "gradient_clipping": CLIP,
              "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": MOMENTUM}},
              "zero_optimization": {"stage": zero_stage}}
    engine, *_ = deepscale.initialize(model=model, config=config)
    assert engine.dp_world_size == dp and engine.grad_world_size == world
    sp_rank, dp_rank = grid.get_sequence_parallel_rank(), grid.get_data_parallel_rank()
    base, extra = divmod(seq, sp)
    lengths = [base + (1 if r < extra else 0) for r in range(sp)]
    start = sum(lengths[:sp_rank])
    losses = []
    for ids in data:
        mine = ids[2 * dp_rank:2 * dp_rank + 2]
        part = slice(start, start + lengths[sp_rank])
        loss = engine((mine[:, part].clamp(min=0), mine[:, part], start))
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL), (losses, ref_losses)
    with deepscale.zero.GatheredParameters(list(engine.module.parameters())) if zero_stage == 3 else _null():
        final = {k: v.detach().clone() for k, v in engine.module.gpt.state_dict().items()}
    engine.destroy()
    reset_parallel_grid()
    return final, dense.state_dict(), losses, ref_losses


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("world, sp, zero_stage, seq", [(2, 2, 0, 8), (2, 2, 0, 7), (4, 4, 1, 10), (4, 2, 2, 8),
                                                        (4, 2, 3, 7)])
def test_ulysses_training_parity(world, sp, zero_stage, seq):
    results = run_distributed(_sp_train_body, world, args=(sp, zero_stage, seq))
    final, ref, losses, ref_losses = results[0]
    for key, value in ref.items():
        assert torch.allclose(final[key], value, rtol=RTOL, atol=ATOL), \
            f"{key}: max diff {(final[key] - value).abs().max().item()}"


def _batch_dim_idx_body():
    import torch.distributed as dist
    from deepscale.sequence.layer import DistributedAttention
    rank = dist.get_rank()
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 8, 4, 8) for _ in range(3))

    def local(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (a, b, c)), is_causal=True).transpose(1, 2)

    ref = local(q, k, v)
    part = slice(rank * 4, rank * 4 + 4)
    # DeepSpeed's call: default scatter/gather indices with batch_dim_idx naming the batch dimension.
    out = DistributedAttention(local, None)(q[:, part], k[:, part], v[:, part], 0)
    assert torch.allclose(out, ref[:, part], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="rotary_pos_emb"):
        DistributedAttention(local, None)(q, k, v, 0, (q, q))


def test_deepspeed_forward_signature_batch_dim_idx():
    run_distributed(_batch_dim_idx_body, 2)
