"""The CUDA attention kernel (op ``flash_attn``) against a float64 reference and torch SDPA.

Skipped without CUDA. The same cases as the CPU kernel's tests: forward, log-sum-exp and the
three gradients; causal/window/softcap, GQA/MQA, head dims 64/96/128/256, bf16/fp16, padded
and packed varlen batches with lengths 1..4096 that are not multiples of the block size.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "ops" / "attention"))
from _attn_cases import TOLERANCE, float64_reference, make_inputs, max_err  # noqa: E402
from deepscale.ops.attention import attention, explain  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _check(lens_q, lens_k, heads, kv_heads, dim, dtype, varlen, **options):
    (q, k, v), extra = make_inputs(lens_q, lens_k, heads, kv_heads, dim, dtype, varlen, device="cuda")
    route = explain(q, k, v, **extra, **options)
    assert route.backend == "flash_attn", route.reason
    out, lse = attention(q, k, v, return_lse=True, **extra, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device="cuda", dtype=dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = float64_reference(q, k, v, grad_out, **extra, **options)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite)
    assert max_err(lse.cpu()[finite], ref_lse[finite]) < 1e-3
    tol = TOLERANCE[dtype]
    errors = {name: max_err(a, b) for name, a, b in (("out", out, ref_out), ("dq", dq, ref_dq), ("dk", dk, ref_dk),
                                                     ("dv", dv, ref_dv))}
    assert all(e < tol for e in errors.values()), f"{errors} (tolerance {tol})"
    return q, k, v, out


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": 37}, {"window": (70, 5)},
                                     {"softcap": 4.0, "causal": True}])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masks_and_softcap(options, dtype):
    _check([130, 65], [130, 65], 4, 2, 64, dtype, varlen=True, **options)


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
def test_head_dims(dim):
    _check([200], [200], 2, 1, dim, torch.bfloat16, varlen=False, causal=True)


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_gqa_mqa_against_sdpa(kv_heads):
    q, k, v, out = _check([256, 256], [256, 256], 8, kv_heads, 128, torch.float16, varlen=False, causal=True)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=kv_heads != 8).transpose(1, 2)
    assert max_err(out, sdpa) < 1e-2


def test_query_and_key_lengths_differ():
    _check([50, 200, 1], [120, 120, 7], 2, 1, 64, torch.bfloat16, varlen=True, causal=True)


def test_varlen_lengths_1_to_4096():
    _check([1, 63, 64, 65, 1000, 4096], [1, 63, 64, 65, 1000, 4096], 2, 1, 128, torch.bfloat16, varlen=True,
           causal=True)
