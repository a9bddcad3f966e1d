"""FusedAdam's CUDA kernel against a float64 reference (skipped without CUDA).

Covers fp32, bf16 and fp16 parameters with fp32 states, Adam and AdamW, with and without
bias correction, sizes that do not fill a chunk (1 element included) and one that spans
several chunks, 100 steps each; and that one step is one kernel launch per dtype group.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = (1, 7, 1000, 70_001)
STEPS = 100


def _reference_step(r, st, t, adam_w_mode, bias_correction, wd, lr=1e-2):
    m = st.setdefault("m", torch.zeros_like(r))
    v = st.setdefault("v", torch.zeros_like(r))
    g = r.grad if adam_w_mode else r.grad + wd * r
    if adam_w_mode:
        r.mul_(1 - lr * wd)
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.999).addcmul_(g, g, value=0.001)
    b1, b2 = (1 - 0.9 ** t, 1 - 0.999 ** t) if bias_correction else (1.0, 1.0)
    r.addcdiv_(m, (v / b2).sqrt().add_(1e-8), value=-lr / b1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
@torch.no_grad()
def test_fused_adam_matches_float64(dtype, adam_w_mode, bias_correction):
    from deepscale.ops.adam import FusedAdam
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
    ours = [t.to(device="cuda", dtype=dtype) for t in init]
    ref = [o.double().cpu() for o in ours]  # start from exactly the stored values
    opt = FusedAdam(ours, lr=1e-2, bias_correction=bias_correction, adam_w_mode=adam_w_mode, weight_decay=0.05)
    assert opt._cuda_op() is not None, "the fused_adam op should build on a CUDA machine"
    states = [{} for _ in ref]
    eps = torch.finfo(dtype).eps
    for step in range(1, STEPS + 1):
        for o, r in zip(ours, ref):
            g = torch.randn(r.shape, generator=gen, dtype=torch.float64)
            o.grad, r.grad = g.to(device="cuda", dtype=dtype), g.to(dtype).double()
        opt.step()
        for o, r, st in zip(ours, ref, states):
            _reference_step(r, st, step, adam_w_mode, bias_correction, 0.05)
            expected = r.to(dtype).double()
            got = o.double().cpu()
            if dtype == torch.float32:
                torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-6)
            else:  # one rounding of the stored parameter per step, then continue from ours
                assert bool(((got - expected).abs() <= eps * expected.abs() + 1e-6).all())
                r.copy_(got)
            m = opt.state[o]["exp_avg"]
            assert m.dtype == torch.float32
            torch.testing.assert_close(m.double().cpu(), st["m"], rtol=1e-4, atol=1e-6)
            if dtype != torch.float32:
                st["m"].copy_(m.double().cpu())
                st["v"].copy_(opt.state[o]["exp_avg_sq"].double().cpu())


@torch.no_grad()
def test_one_kernel_launch_per_dtype_group():
    from torch.profiler import ProfilerActivity, profile

    from deepscale.ops.adam import FusedAdam
    params = [torch.randn(n, device="cuda") for n in (10, 100_000, 3)]
    params += [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (5, 50_000)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = FusedAdam(params)
    opt.step()  # build and warm up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if "fused_adam_kernel" in e.name]
    assert len(launches) == 2  # one fp32 group, one bf16 group
