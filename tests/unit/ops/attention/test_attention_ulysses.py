"""The fused attention as the local attention of Ulysses sequence parallelism (2 gloo ranks).

``DistributedAttention(FusedAttention(causal=True), group, scatter_idx=2, gather_idx=1)`` on
each rank's sequence slice must equal the fused attention of the whole sequence on one process
(fp32; output and the q/k/v gradients of the slice), with GQA and a sequence the degree does
not divide.
"""
import os
import shutil

import torch

from dist_harness import run_distributed

RTOL, ATOL = 1e-5, 1e-5


def _ulysses_body(seq, heads, kv_heads):
    import torch.distributed as dist
    from deepscale.ops.attention import FusedAttention, explain
    from deepscale.sequence.layer import DistributedAttention
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(11)
    q = torch.randn(2, seq, heads, 64, requires_grad=True)
    k = torch.randn(2, seq, kv_heads, 64, requires_grad=True)
    v = torch.randn(2, seq, kv_heads, 64, requires_grad=True)
    w = torch.randn(2, seq, heads, 64)
    local = FusedAttention(causal=True)
    backend = explain(q, k, v, causal=True).backend
    ref = local(q, k, v)
    (ref * w).sum().backward()
    base, extra = divmod(seq, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    lq, lk, lv = (t.detach()[:, lo:hi].clone().requires_grad_() for t in (q, k, v))
    out = DistributedAttention(local, None, scatter_idx=2, gather_idx=1)(lq, lk, lv)
    (out * w[:, lo:hi]).sum().backward()
    for name, got, want in (("out", out, ref[:, lo:hi]), ("dq", lq.grad, q.grad[:, lo:hi]),
                            ("dk", lk.grad, k.grad[:, lo:hi]), ("dv", lv.grad, v.grad[:, lo:hi])):
        assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), f"{name}: max diff {(got - want).abs().max().item()}"
    return backend


def test_ulysses_with_fused_local_attention():
    backends = run_distributed(_ulysses_body, 2, args=(131, 4, 2), timeout=300)
    compiled = shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja")
    assert backends == (["cpu_attention"] * 2 if compiled else ["sdpa"] * 2)
