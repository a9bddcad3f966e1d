"""FusedAdam without a GPU: the CUDA kernel compiles with nvcc, and the class falls back on CPU."""
import pytest
import torch

from _ops_test_helpers import needs_cxx
from deepscale.ops.adam import FusedAdam
from op_builder import FusedAdamBuilder
from op_builder.fused_adam import find_nvcc


@needs_cxx
@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not installed")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    obj = FusedAdamBuilder().compile_kernel_object(tmp_path, arch="80")
    assert obj.is_file() and obj.stat().st_size > 0


@needs_cxx
def test_cpu_torch_gives_a_reason():
    compat = FusedAdamBuilder().is_compatible()
    if torch.version.cuda is None:
        assert not compat
        assert "without CUDA" in compat.reason or "nvcc" in compat.reason


def _run(dtype, adam_w_mode, bias_correction, weight_decay, steps=20):
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 9, 1000)
    init = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    ours = [t.to(dtype) for t in init]
    ref = [t.clone() for t in init]
    opt = FusedAdam(ours, lr=1e-2, bias_correction=bias_correction, adam_w_mode=adam_w_mode, weight_decay=weight_decay)
    ref_state = {}
    for _ in range(steps):
        grads = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
        for o, r, g in zip(ours, ref, grads):
            o.grad, r.grad = g.to(dtype), g.clone()
        opt.step()
        # float64 reference, parameter rounded to `dtype` each step like the stored one
        for r in ref:
            st = ref_state.setdefault(id(r), {})
            m = st.setdefault("m", torch.zeros_like(r))
            v = st.setdefault("v", torch.zeros_like(r))
            g = r.grad if adam_w_mode else r.grad + weight_decay * r
            if adam_w_mode:
                r.mul_(1 - 1e-2 * weight_decay)
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            t = opt.param_groups[0]["step"]
            b1, b2 = (1 - 0.9 ** t, 1 - 0.999 ** t) if bias_correction else (1.0, 1.0)
            r.addcdiv_(m, (v / b2).sqrt().add_(1e-8), value=-1e-2 / b1)
            r.copy_(r.to(dtype).double())
    return ours, ref


@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_cpu_fallback_matches_reference_fp32(adam_w_mode, bias_correction):
    with torch.no_grad():
        ours, ref = _run(torch.float32, adam_w_mode, bias_correction, weight_decay=0.1)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


def test_cpu_fallback_bf16_params_keep_fp32_states():
    with torch.no_grad():
        ours, ref = _run(torch.bfloat16, True, True, weight_decay=0.0, steps=5)
    opt_states = [t.dtype for t in ours]
    assert opt_states == [torch.bfloat16] * 3
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=2e-2, atol=2e-2)


def test_bad_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdam(p, amsgrad=True)
    with pytest.raises(ValueError, match="betas"):
        FusedAdam(p, betas=(1.2, 0.9))


def test_zero_grad_sets_none_by_default():
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    opt = FusedAdam([p])
    opt.step()
    opt.zero_grad()
    assert p.grad is None
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_deepspeed_import_names_resolve():
    from deepscale.ops.adagrad import DeepScaleCPUAdagrad, DeepSpeedCPUAdagrad
    from deepscale.ops.adam import DeepScaleCPUAdam, DeepSpeedCPUAdam
    from deepscale.ops.aio import AsyncIOBuilder
    from deepscale.ops.lion import DeepScaleCPULion, DeepSpeedCPULion
    from deepscale.ops.op_builder import CPUAdamBuilder
    assert DeepSpeedCPUAdam is DeepScaleCPUAdam and DeepSpeedCPUAdagrad is DeepScaleCPUAdagrad
    assert DeepSpeedCPULion is DeepScaleCPULion
    assert CPUAdamBuilder.NAME == "cpu_adam" and AsyncIOBuilder.NAME == "async_io"
