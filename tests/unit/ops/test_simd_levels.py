"""The non-native SIMD paths: the portable (scalar/NEON) build runs, the AVX-512 one compiles."""
import shutil
import subprocess
import textwrap

import pytest

from _ops_test_helpers import needs_cxx, run_python
from op_builder import CPUAdamBuilder, csrc_root
from op_builder.simd import simd_flags


@needs_cxx
def test_portable_build_matches_the_pytorch_path(tmp_path):
    code = textwrap.dedent("""
        import torch
        from deepscale.ops.adam import DeepScaleCPUAdam
        from deepscale.ops.native import simd_level
        gen = torch.Generator().manual_seed(0)
        worst = 0.0
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            fast = [torch.randn(n, generator=gen).to(dtype) for n in (1, 17, 1001)]
            slow = [t.clone() for t in fast]
            a, b = DeepScaleCPUAdam(fast, lr=1e-2, weight_decay=0.1), DeepScaleCPUAdam(slow, lr=1e-2, weight_decay=0.1)
            b._op = None
            for _ in range(10):
                for f, s in zip(fast, slow):
                    f.grad = torch.randn(f.shape, generator=gen).to(dtype)
                    s.grad = f.grad.clone()
                a.step(); b.step()
            for f, s in zip(fast, slow):
                # Near zero the error follows the update size (~lr), not the value.
                ulp = torch.finfo(dtype).eps * s.float().abs().clamp(min=1.0)
                worst = max(worst, ((f.float() - s.float()).abs() / ulp).max().item())
        print("LEVEL", simd_level(a._op), "COMPILED", a.uses_compiled_op, "WORST_ULPS", worst)
    """)
    result = run_python(code, {"DEEPSCALE_SIMD": "scalar", "DEEPSCALE_OP_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    fields = result.stdout.split()
    assert fields[fields.index("LEVEL") + 1] == "scalar"
    assert fields[fields.index("COMPILED") + 1] == "True"
    assert float(fields[fields.index("WORST_ULPS") + 1]) <= 4.0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_avx512_kernels_compile(tmp_path):
    source = csrc_root() / "cpu_optim" / "adam_kernel.cpp"
    cmd = ["g++", "-c", "-fPIC", *CPUAdamBuilder().cxx_args()[:4], "-fopenmp", *simd_flags("avx512"),
           f"-I{csrc_root() / 'cpu_optim'}", str(source), "-o", str(tmp_path / "adam_avx512.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "adam_avx512.o").stat().st_size > 0
