"""deepscale.ops.attention: argument checks, routing reasons, the PyTorch reference and dropout.

The reference is checked against an independent dense formula (explicit loops over sequences
and heads in float64), so the kernels' tests can trust it. Runs without a compiler.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from deepscale.ops.attention import FusedAttention, attention, build_spec, explain, reference_attention
from deepscale.ops.attention.spec import visible_mask


def _dense(q, k, v, causal=False, scale=None, window=None, softcap=None):
    """One sequence [s, h, d] in float64 by the textbook formula (FlashAttention's mask rules)."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    scale = scale or 1.0 / math.sqrt(d)
    out = torch.zeros(sq, h, v.shape[-1], dtype=torch.float64)
    left, right = (window, window) if isinstance(window, int) else (window or (-1, -1))
    if causal:
        right = 0
    for head in range(h):
        kv = head // (h // hk)
        for i in range(sq):
            pos = i + sk - sq
            scores = []
            for j in range(sk):
                if (right >= 0 and j - pos > right) or (left >= 0 and pos - j > left):
                    continue
                s = float(q[i, head] @ k[j, kv]) * scale
                if softcap:
                    s = softcap * math.tanh(s / softcap)
                scores.append((j, s))
            if not scores:
                continue
            top = max(s for _, s in scores)
            weights = [(j, math.exp(s - top)) for j, s in scores]
            total = sum(w for _, w in weights)
            for j, w in weights:
                out[i, head] += w / total * v[j, kv]
    return out


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": 3}, {"window": (4, 1)},
                                     {"causal": True, "window": 2}, {"softcap": 2.0, "causal": True},
                                     {"softmax_scale": 0.3}])
@pytest.mark.parametrize("lens", [((5, 5), (5, 5)), ((3, 7), (6, 4)), ((1, 4), (1, 9))])
def test_reference_matches_dense_formula(options, lens):
    lens_q, lens_k = lens
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lens_q), 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens_k), 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 8, generator=gen, dtype=torch.float64)
    cu_q, cu_k = [0, lens_q[0], sum(lens_q)], [0, lens_k[0], sum(lens_k)]
    out = attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **options)
    scale = options.get("softmax_scale")
    for b in range(2):
        want = _dense(q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]],
                      causal=options.get("causal", False), scale=scale, window=options.get("window"),
                      softcap=options.get("softcap"))
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], want, rtol=1e-10, atol=1e-10)


def test_padded_and_packed_layouts_agree_and_match_sdpa():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 4, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    padded = attention(q, k, v, causal=True)
    packed = attention(q.reshape(18, 4, 16), k.reshape(18, 4, 16), v.reshape(18, 4, 16), causal=True,
                       cu_seqlens_q=[0, 9, 18], cu_seqlens_k=torch.tensor([0, 9, 18]))
    torch.testing.assert_close(padded.reshape(18, 4, 16), packed)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(padded, sdpa.transpose(1, 2))


def test_rows_that_see_no_key_output_zeros_with_finite_grads():
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    spec = build_spec(q, k, v, causal=True)
    out, lse = reference_attention(q, k, v, spec, return_lse=True)
    assert torch.equal(out[0, :3], torch.zeros(3, 2, 8, dtype=torch.float64))  # bottom-right aligned
    assert torch.isinf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_visible_mask_convention():
    mask = visible_mask(2, 4, left=1, right=0)  # rows sit at key positions 2 and 3
    assert mask.tolist() == [[False, True, True, False], [False, False, True, True]]


@pytest.mark.parametrize("kwargs, error, words", [
    ({"window": -2}, ValueError, "window"),
    ({"window": (1, 2, 3)}, TypeError, "window"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
    ({"softmax_scale": 0}, ValueError, "softmax_scale"),
    ({"cu_seqlens_q": [0, 4]}, ValueError, "cu_seqlens_k"),
])
def test_bad_arguments_name_the_argument(kwargs, error, words):
    q = k = v = torch.randn(1, 4, 2, 8)
    with pytest.raises(error, match=words):
        attention(q, k, v, **kwargs)


def test_bad_shapes_and_dtypes_are_explained():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])
    packed = torch.randn(7, 2, 8)
    with pytest.raises(ValueError, match="packed token count"):
        attention(packed, packed, packed, cu_seqlens_q=[0, 3, 6], cu_seqlens_k=[0, 3, 7])
    with pytest.raises(ValueError, match="max_seqlen_q"):
        attention(packed, packed, packed, cu_seqlens_q=[0, 3, 7], cu_seqlens_k=[0, 3, 7], max_seqlen_q=2)


def test_router_reasons(monkeypatch):
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    route = explain(q, q, q, causal=True)
    assert route.backend == "sdpa" and "float64" in route.reason
    route = explain(q, q, q, softcap=3.0)
    assert route.backend == "reference" and "float64" in route.reason
    monkeypatch.setenv("DEEPSCALE_ATTENTION_BACKEND", "reference")
    route = explain(q.float(), q.float(), q.float())
    assert route.backend == "reference" and "DEEPSCALE_ATTENTION_BACKEND=reference" in route.reason
    monkeypatch.setenv("DEEPSCALE_ATTENTION_BACKEND", "fastest")
    with pytest.raises(ValueError, match="allowed: auto, sdpa, reference"):
        explain(q, q, q)


def test_dropout_is_unbiased_and_differentiable():
    torch.manual_seed(0)
    q = torch.randn(1, 256, 2, 16, requires_grad=True)
    k = torch.randn(1, 256, 2, 16)
    v = torch.ones(1, 256, 2, 16)
    out = attention(q, k, v, dropout_p=0.3, softcap=5.0)  # softcap: the reference runs the dropout
    assert not torch.allclose(out, torch.ones_like(out))  # weights were dropped and rescaled
    assert abs(out.mean().item() - 1.0) < 0.02  # inverted dropout keeps the expectation
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_module_form_drops_only_in_training():
    torch.manual_seed(0)
    layer = FusedAttention(causal=True, dropout_p=0.5)
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    layer.eval()
    torch.testing.assert_close(layer(q, k, v), attention(q, k, v, causal=True))
    layer.train()
    assert not torch.allclose(layer(q, k, v), attention(q, k, v, causal=True))
    assert "causal=True" in repr(layer)


@pytest.mark.parametrize("forced", ["sdpa", "reference"])
@pytest.mark.parametrize("options", [{"causal": True}, {"window": (5, 2)}, {"softcap": 3.0}])
@pytest.mark.parametrize("varlen", [False, True])
def test_pytorch_fallbacks_match_float64(monkeypatch, forced, options, varlen):
    """The fallbacks (forced) against the float64 reference: output and all three gradients, GQA, fp32."""
    from _attn_cases import float64_reference, make_inputs, max_err
    monkeypatch.setenv("DEEPSCALE_ATTENTION_BACKEND", forced)
    (q, k, v), extra = make_inputs([20, 20], [20, 20], 4, 2, 16, torch.float32, varlen=varlen)
    route = explain(q, k, v, **extra, **options)
    expected = "sdpa" if forced == "sdpa" and not varlen and not options.get("softcap") else "reference"
    assert route.backend == expected and route.reason
    out = attention(q, k, v, **extra, **options)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got = [out] + list(torch.autograd.grad(out, (q, k, v), grad))
    want = float64_reference(q, k, v, grad, **extra, **options)
    want = want[:1] + want[2:]
    assert max(max_err(a, b) for a, b in zip(got, want)) < 2e-5


def test_dispatch_modes_see_aten_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 16, 2, 64) for _ in range(3))
    with Recorder() as recorder:
        route = explain(q, k, v, causal=True)
        out = attention(q, k, v, causal=True)
    assert route.backend == "sdpa" and "TorchDispatchMode" in route.reason
    assert any("scaled_dot_product" in op for op in recorder.ops)
    torch.testing.assert_close(out, attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
