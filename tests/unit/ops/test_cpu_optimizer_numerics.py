"""The compiled CPU optimizers against float64 references over 100 steps.

Sizes are not multiples of any SIMD width (1 element included) and share one optimizer, so
the vector body, the scalar tail and the multi-tensor slot list are all exercised.
bf16 parameters are compared with a float64 reference that rounds the parameter to bf16
after every step (what storing a bf16 parameter means); fp32 ones with torch's own fp32
optimizer's distance to the same reference as the yardstick of "fp32 rounding".
"""
import pytest
import torch

from _ops_test_helpers import needs_cxx
from deepscale.ops.adagrad import DeepScaleCPUAdagrad
from deepscale.ops.adam import DeepScaleCPUAdam
from deepscale.ops.lion import DeepScaleCPULion

SIZES = (1, 7, 33, 1000, 4099)
STEPS = 100


class Float64Lion(torch.optim.Optimizer):
    """Reference Lion update (Chen et al., 2023) for the test only."""

    def __init__(self, params, lr, betas, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(beta1 * m + (1 - beta1) * p.grad), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def _make(kind, params, wd, bias_correction, dtype_is_ref):
    """(our optimizer or the torch reference) for ``kind``."""
    if kind in ("adam", "adamw"):
        if dtype_is_ref:
            if not bias_correction:
                return None
            cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
            return cls(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
        return DeepScaleCPUAdam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd,
                                bias_correction=bias_correction, adamw_mode=kind == "adamw")
    if kind == "adagrad":
        if dtype_is_ref:
            return torch.optim.Adagrad(params, lr=1e-2, eps=1e-10, weight_decay=wd)
        return DeepScaleCPUAdagrad(params, lr=1e-2, eps=1e-10, weight_decay=wd)
    if dtype_is_ref:
        return Float64Lion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=wd)
    return DeepScaleCPULion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=wd)


class _NoBiasAdam(torch.optim.Optimizer):
    """Adam/AdamW without bias correction (torch.optim has no switch for it)."""

    def __init__(self, params, adamw, wd):
        super().__init__(params, dict(lr=1e-2, wd=wd))
        self.adamw = adamw

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                m = st.setdefault("m", torch.zeros_like(p))
                v = st.setdefault("v", torch.zeros_like(p))
                g = p.grad if self.adamw else p.grad + group["wd"] * p
                if self.adamw:
                    p.mul_(1 - group["lr"] * group["wd"])
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.99).addcmul_(g, g, value=0.01)
                p.addcdiv_(m, v.sqrt().add_(1e-8), value=-group["lr"])


def _reference(kind, params, wd, bias_correction):
    ref = _make(kind, params, wd, bias_correction, dtype_is_ref=True)
    return ref if ref is not None else _NoBiasAdam(params, kind == "adamw", wd)


def _run(kind, dtype, wd, bias_correction, seed=0):
    """Returns (ours, float64 reference, torch fp32 run) parameter lists after STEPS steps."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
    ref = [t.clone() for t in init]
    ours = [t.to(dtype) for t in init]
    f32 = [t.float() for t in init]
    opt_ref = _reference(kind, ref, wd, bias_correction)
    opt_ours = _make(kind, ours, wd, bias_correction, dtype_is_ref=False)
    opt_f32 = _reference(kind, f32, wd, bias_correction)
    assert opt_ours.uses_compiled_op, "the compiled op should build on this machine"
    for _ in range(STEPS):
        grads = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
        for r, o, f, g in zip(ref, ours, f32, grads):
            r.grad, o.grad, f.grad = g.clone(), g.to(dtype), g.float()
        opt_ref.step()
        opt_ours.step()
        opt_f32.step()
        if dtype != torch.float32:
            with torch.no_grad():
                for r in ref:
                    r.copy_(r.to(dtype).double())
    return ours, ref, f32


CASES = [(k, wd, bc) for k in ("adam", "adamw") for wd in (0.0, 0.1) for bc in (True, False)]
CASES += [(k, wd, True) for k in ("adagrad", "lion") for wd in (0.0, 0.1)]


@needs_cxx
@pytest.mark.parametrize("kind,wd,bias_correction", CASES)
def test_fp32_params_match_float64_reference(kind, wd, bias_correction):
    ours, ref, f32 = _run(kind, torch.float32, wd, bias_correction)
    for o, r, f in zip(ours, ref, f32):
        our_err = (o.double() - r).abs().max().item()
        torch_err = (f.double() - r).abs().max().item()
        # Within a few times torch's own fp32 rounding error, with a floor of a few fp32 ulps.
        assert our_err <= 4 * torch_err + 4e-6, (o.numel(), our_err, torch_err)


_STATE_NAMES = {  # our state name -> the reference optimizer's
    "adam": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    "adamw": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    "adagrad": {"sum": "sum"},
    "lion": {"exp_avg": "exp_avg"},
}


@pytest.mark.parametrize("kind,wd,bias_correction", CASES)
def test_bf16_params_match_float64_reference(kind, wd, bias_correction):
    """Every one of 100 steps, from identical state, lands within one bf16 rounding of float64.

    Over many steps two correct implementations drift apart by whole bf16 ulps (a value near a
    rounding midpoint goes one way in fp32 math and the other in float64), so the reference is
    re-synchronised to our parameters and states after each compared step.
    """
    gen = torch.Generator().manual_seed(5)
    ours = [torch.randn(n, generator=gen).bfloat16() for n in SIZES]
    ref = [o.double() for o in ours]
    opt_ours = _make(kind, ours, wd, bias_correction, dtype_is_ref=False)
    opt_ref = _reference(kind, ref, wd, bias_correction)
    names = dict(_STATE_NAMES[kind])
    if kind in ("adam", "adamw") and not bias_correction:
        names = {"exp_avg": "m", "exp_avg_sq": "v"}
    eps = torch.finfo(torch.bfloat16).eps
    for _ in range(STEPS):
        for o, r in zip(ours, ref):
            g = torch.randn(o.shape, generator=gen).bfloat16()
            o.grad, r.grad = g, g.double()
        opt_ours.step()
        opt_ref.step()
        with torch.no_grad():
            for o, r in zip(ours, ref):
                expected = r.bfloat16().double()
                assert bool(((o.double() - expected).abs() <= eps * expected.abs() + 1e-30).all()), o.numel()
                for ours_name, ref_name in names.items():
                    ours_state = opt_ours.state[o][ours_name].double()
                    ref_state = opt_ref.state[r][ref_name]
                    torch.testing.assert_close(ours_state, ref_state, rtol=1e-5, atol=1e-7)
                    ref_state.copy_(ours_state)
                r.copy_(o.double())


def test_fp16_params_and_copy_out_in_the_same_pass():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(n, generator=gen) for n in SIZES]
    outs_bf16 = [torch.empty(n, dtype=torch.bfloat16) for n in SIZES]
    outs_f16 = [torch.empty(n, dtype=torch.float16) for n in SIZES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    a = DeepScaleCPUAdam([p.clone() for p in params], lr=1e-2)
    b = DeepScaleCPUAdam([p.clone() for p in params], lr=1e-2)
    for p_a, p_b, p in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], params):
        p_a.grad, p_b.grad = p.grad.clone(), p.grad.clone()
    a.step(fp16_param_groups=[outs_bf16])
    b.step(fp16_param_groups=outs_f16)  # a flat list is accepted for a single group
    for p_a, out16, outb in zip(a.param_groups[0]["params"], outs_f16, outs_bf16):
        assert torch.equal(outb, p_a.to(torch.bfloat16))
        assert torch.equal(out16, p_a.to(torch.float16))


def test_large_copy_out_streams_the_same_values():
    # Over 2M elements per step the copy-out buffer is written with non-temporal stores when
    # it is aligned; a buffer one element off the alignment takes the ordinary stores.
    gen = torch.Generator().manual_seed(5)
    n = (1 << 21) + 13
    param = torch.randn(n, generator=gen)
    param.grad = torch.randn(n, generator=gen)
    opt = DeepScaleCPUAdam([param], lr=1e-2, num_threads=2)
    for dtype in (torch.bfloat16, torch.float16):
        aligned = torch.empty(n, dtype=dtype)
        misaligned = torch.empty(n + 1, dtype=dtype)[1:]
        for out in (aligned, misaligned):
            opt.step(fp16_param_groups=[[out]])
            assert torch.equal(out, param.to(dtype))


def test_fp16_params_with_fp32_grads_and_states():
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(n, generator=gen) for n in SIZES]
    ours, slow = [t.half() for t in init], [t.half() for t in init]
    opt, opt_slow = DeepScaleCPUAdam(ours, lr=1e-2), DeepScaleCPUAdam(slow, lr=1e-2)
    opt_slow._op = None  # the PyTorch path: fp32 math, then one rounding to fp16
    for t in ours + slow:
        if hasattr(t, "grad_dtype"):  # recent torch checks grad dtypes unless told not to
            t.grad_dtype = None
    for _ in range(20):
        for o, s in zip(ours, slow):
            o.grad = torch.randn(o.shape, generator=gen)  # fp32 grads with fp16 params
            s.grad = o.grad.clone()
        opt.step()
        opt_slow.step()
    for o, s in zip(ours, slow):
        assert o.dtype == torch.float16 and opt.state[o]["exp_avg"].dtype == torch.float32
        ulp = torch.finfo(torch.float16).eps * s.float().abs().clamp(min=1e-3)
        assert bool(((o.float() - s.float()).abs() <= 2 * ulp).all())


def test_kernel_and_pytorch_fallback_agree():
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen) for n in SIZES]
    for cls, kwargs in ((DeepScaleCPUAdam, dict(weight_decay=0.05)), (DeepScaleCPUAdagrad, dict(weight_decay=0.05)),
                        (DeepScaleCPULion, dict(weight_decay=0.05))):
        fast, slow = [t.clone() for t in init], [t.clone() for t in init]
        opt_fast, opt_slow = cls(fast, **kwargs), cls(slow, **kwargs)
        opt_slow._op = None
        for _ in range(20):
            for f, s in zip(fast, slow):
                f.grad = torch.randn(f.shape, generator=gen)
                s.grad = f.grad.clone()
            opt_fast.step()
            opt_slow.step()
        for f, s in zip(fast, slow):
            torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-6)


def test_thread_count_does_not_change_results():
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(300_001, generator=gen)
    grad = torch.randn(300_001, generator=gen)
    results = []
    for threads in (1, 2):
        p = init.clone()
        p.grad = grad.clone()
        opt = DeepScaleCPUAdam([p], num_threads=threads)
        for _ in range(3):
            opt.step()
        results.append(p)
    assert torch.equal(results[0], results[1])


def test_half_states_when_fp32_optimizer_states_is_false():
    p = torch.randn(37, dtype=torch.bfloat16)
    p.grad = torch.randn(37, dtype=torch.bfloat16)
    before = p.clone()
    opt = DeepScaleCPUAdam([p], lr=1e-1, fp32_optimizer_states=False)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert not torch.equal(p, before)


def test_state_dict_round_trip_keeps_fp32_states():
    p = torch.randn(10, dtype=torch.bfloat16)
    p.grad = torch.randn(10, dtype=torch.bfloat16)
    opt = DeepScaleCPUAdam([p])
    opt.step()
    state = opt.state_dict()
    q = p.clone()
    opt2 = DeepScaleCPUAdam([q])
    opt2.load_state_dict(state)
    assert opt2.state[q]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    assert opt2.state[q]["step"] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(amsgrad=True), "amsgrad"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(lr=-1.0), "lr"),
    (dict(num_threads=0), "num_threads"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepScaleCPUAdam([torch.zeros(3, requires_grad=True)], **kwargs)


def test_wrong_copy_out_buffer_is_rejected():
    p = torch.zeros(4)
    p.grad = torch.ones(4)
    opt = DeepScaleCPUAdam([p])
    with pytest.raises(ValueError, match="fp16_param_groups"):
        opt.step(fp16_param_groups=[[torch.zeros(4)]])  # fp32 is not a copy-out dtype
    with pytest.raises(ValueError, match="elements"):
        opt.step(fp16_param_groups=[[torch.zeros(5, dtype=torch.half)]])


@needs_cxx
def test_reused_packing_follows_new_grads_and_swapped_states():
    """The cached slot packing must never write through stale addresses."""
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(n, generator=gen) for n in SIZES]
    fast, slow = [t.clone() for t in init], [t.clone() for t in init]
    opt_fast, opt_slow = DeepScaleCPUAdam(fast, lr=1e-2), DeepScaleCPUAdam(slow, lr=1e-2)
    opt_slow._op = None
    for step in range(6):
        for f, s in zip(fast, slow):
            g = torch.randn(f.shape, generator=gen)
            if step % 2 == 0 and f.grad is not None:
                f.grad.copy_(g)  # same tensors: the cached packing applies
            else:
                f.grad = g.clone()  # new tensors: it must be rebuilt
            s.grad = g.clone()
        if step == 4:  # states swapped in from elsewhere (as NVMe offload does)
            for f in fast:
                opt_fast.state[f]["exp_avg"] = opt_fast.state[f]["exp_avg"].clone()
        opt_fast.step()
        opt_slow.step()
        for f, s in zip(fast, slow):
            torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-6)
    assert opt_fast._plans, "the packing should be cached after a step on unchanged tensors"
