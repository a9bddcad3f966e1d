"""The compiled CPU attention kernel (op ``cpu_attention``) against a float64 reference.

Forward output, log-sum-exp and all three gradients; causal/non-causal, sliding windows,
softcap, GQA/MQA, head dims 64/96/128/256, fp32/bf16/fp16, padded and packed varlen batches
with lengths from 1 to 4096 (including lengths that are not a multiple of the 64-row block
and query/key lengths that differ); thread-count independence; O(S) memory.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _attn_cases import TOLERANCE, float64_reference, make_inputs, max_err
from deepscale.ops.attention import attention, explain

_CXX = os.environ.get("CXX", "c++")
pytestmark = pytest.mark.skipif(shutil.which(_CXX) is None or shutil.which("ninja") is None,
                                reason=f"needs a C++ compiler ('{_CXX}') and ninja to build op cpu_attention")
REPO_ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module", autouse=True)
def kernel_available():
    q = torch.randn(1, 4, 1, 64)
    route = explain(q, q, q)
    if route.backend != "cpu_attention":
        pytest.fail(f"op cpu_attention did not load on a machine with a compiler: {route.reason}")


def _check(lens_q, lens_k, heads, kv_heads, dim, dtype, varlen, tol_scale=1.0, **options):
    (q, k, v), extra = make_inputs(lens_q, lens_k, heads, kv_heads, dim, dtype, varlen)
    assert explain(q, k, v, **extra, **options).backend == "cpu_attention"
    out, lse = attention(q, k, v, return_lse=True, **extra, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = float64_reference(q, k, v, grad_out, **extra, **options)
    tol = TOLERANCE[dtype] * tol_scale
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_err(lse[finite], ref_lse[finite]) < 1e-4
    errors = {name: max_err(a, b) for name, a, b in (("out", out, ref_out), ("dq", dq, ref_dq), ("dk", dk, ref_dk),
                                                     ("dv", dv, ref_dv))}
    assert all(e < tol for e in errors.values()), f"{errors} (tolerance {tol})"


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": 37}, {"window": (70, 5)},
                                     {"causal": True, "window": 100}, {"softcap": 4.0, "causal": True}])
def test_fp32_masks_and_softcap(options):
    _check([130, 65], [130, 65], 4, 2, 64, torch.float32, varlen=True, **options)


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
def test_head_dims(dim):
    _check([70], [70], 2, 1, dim, torch.float32, varlen=False, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_dtypes(dtype, causal):
    _check([96, 96], [96, 96], 4, 4, 64, dtype, varlen=False, causal=causal)


@pytest.mark.parametrize("kv_heads", [1, 2, 8])  # MQA, GQA, MHA
def test_gqa_and_mqa(kv_heads):
    _check([100], [100], 8, kv_heads, 64, torch.float32, varlen=False, causal=True)


def test_query_and_key_lengths_differ():
    # Bottom-right causal alignment; the 200-query sequence has 80 rows that see no key.
    _check([50, 200, 1], [120, 120, 7], 2, 1, 64, torch.float32, varlen=True, causal=True)
    _check([33], [150], 2, 2, 64, torch.float32, varlen=False, window=(20, 10))


def test_varlen_lengths_1_to_4096():
    _check([1, 63, 64, 65, 1000, 4096], [1, 63, 64, 65, 1000, 4096], 1, 1, 64, torch.float32, varlen=True,
           tol_scale=2.0, causal=True)


def test_bf16_varlen_window():
    _check([1, 200, 129], [1, 200, 129], 4, 2, 128, torch.bfloat16, varlen=True, window=(50, 0))


def test_results_do_not_depend_on_thread_count():
    (q, k, v), extra = make_inputs([300, 77], [300, 77], 4, 2, 64, torch.float32, varlen=True)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = attention(q, k, v, causal=True, **extra)
            results.append((out,) + torch.autograd.grad(out.sum(), (q, k, v)))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_strided_inputs_are_accepted():
    base = torch.randn(2, 80, 3, 4, 64)  # a fused qkv tensor
    q, k, v = (base[:, :, i] for i in range(3))
    q.requires_grad_()
    out = attention(q, k, v, causal=True)
    ref = attention(q.detach().contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


_MEMORY_SCRIPT = """
import resource, torch
from deepscale.ops.attention import attention, explain
torch.set_num_threads(1)
def run(s):
    q, k, v = (torch.randn(1, s, 1, 64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, causal=True, window=128)
    out.sum().backward()
    return explain(q, k, v, causal=True, window=128).backend
run(256)  # build/load the op, warm the allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
backend = run(16384)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(backend, grown)
"""


def test_memory_is_linear_in_sequence_length():
    # A 16384 x 16384 fp32 score matrix is 1 GiB; inputs, outputs and gradients are 4 MiB each.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=str(REPO_ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    backend, grown_kib = proc.stdout.split()[-2:]
    assert backend == "cpu_attention"
    assert int(grown_kib) < 128 * 1024, f"peak RSS grew by {int(grown_kib) // 1024} MiB at S=16384"


_SIMD_SCRIPT = """
import sys, torch
sys.path.insert(0, {helpers!r})
from _attn_cases import float64_reference, make_inputs, max_err
from deepscale.ops.attention import attention, explain
from deepscale.ops.op_loader import load_op
from deepscale.ops.native import simd_level
(q, k, v), extra = make_inputs([100, 37], [100, 37], 4, 2, 64, torch.float32, True)
assert explain(q, k, v, causal=True, **extra).backend == "cpu_attention"
out = attention(q, k, v, causal=True, softcap=3.0, **extra)
grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
got = [out] + list(torch.autograd.grad(out, (q, k, v), grad))
ref = float64_reference(q, k, v, grad, causal=True, softcap=3.0, **extra)
print(simd_level(load_op("cpu_attention")), max(max_err(a, b) for a, b in zip(got, ref[:1] + ref[2:])))
"""


@pytest.mark.parametrize("level", ["avx2", "scalar"])
def test_other_simd_levels(level):
    from op_builder.simd import simd_support_reason
    reason = simd_support_reason(level)
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, DEEPSCALE_SIMD=level,
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = _SIMD_SCRIPT.format(helpers=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=str(REPO_ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built_level, err = proc.stdout.split()[-2:]
    assert built_level == level and float(err) < 2e-5


def test_double_backward_is_refused():
    (q, k, v), _ = make_inputs([64], [64], 2, 2, 64, torch.float32, varlen=False)
    out = attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(dq.sum(), q)
