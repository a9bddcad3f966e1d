"""Build behaviour of the op builders: cache, concurrency, compatibility reasons, errors, fallback."""
import json
import os
import textwrap
import threading

import pytest

from _ops_test_helpers import needs_cxx, run_python
from deepscale.ops import op_loader
from op_builder import ALL_OPS, CPUAdamBuilder, OpBuilder, OpBuildError, get_builder
from op_builder.simd import SIMD_LEVELS, cpu_info, detect_simd_level

TINY_SOURCE = 'extern "C" int ds_tiny_add_one(int x) { return x + 1; }\n'
BROKEN_SOURCE = 'extern "C" int ds_tiny_add_one(int x) { return x + undefined_name_42; }\n'


def _tiny_builder_code(source_path, name):
    return textwrap.dedent(f"""
        from op_builder import OpBuilder
        class TinyBuilder(OpBuilder):
            NAME = {name!r}
            def sources(self):
                return [{str(source_path)!r}]
    """)


def test_simd_level_matches_cpu_flags(monkeypatch):
    monkeypatch.delenv("DEEPSCALE_SIMD", raising=False)
    level = detect_simd_level()
    arch, flags = cpu_info()
    assert level in SIMD_LEVELS
    if level == "avx2":
        assert {"avx2", "fma", "f16c"} <= flags
    if "avx512f" not in flags:
        assert level != "avx512"


def test_simd_level_is_in_flags_and_cache_key(monkeypatch):
    monkeypatch.setenv("DEEPSCALE_SIMD", "scalar")
    scalar_args, scalar_key = CPUAdamBuilder().cxx_args(), CPUAdamBuilder().cache_key()
    monkeypatch.setenv("DEEPSCALE_SIMD", "avx2")
    avx2_args, avx2_key = CPUAdamBuilder().cxx_args(), CPUAdamBuilder().cache_key()
    assert "-D__DEEPSCALE_SIMD_SCALAR__" in scalar_args and "-mavx2" in avx2_args
    assert scalar_key != avx2_key


def test_bad_simd_override_names_the_variable(monkeypatch):
    monkeypatch.setenv("DEEPSCALE_SIMD", "sse9")
    with pytest.raises(ValueError, match="DEEPSCALE_SIMD.*allowed"):
        detect_simd_level()


def test_unsupported_cpu_is_a_reason(monkeypatch):
    _, flags = cpu_info()
    if "avx512f" in flags:
        pytest.skip("this CPU has AVX-512")
    monkeypatch.setenv("DEEPSCALE_SIMD", "avx512")
    compat = CPUAdamBuilder().is_compatible()
    assert not compat and "unsupported CPU" in compat.reason and "avx512f" in compat.reason


def test_missing_compiler_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    compat = get_builder("cpu_lion").is_compatible()
    assert not compat
    assert compat.reason.startswith("no C++ compiler")


def test_every_op_has_a_builder_with_a_verdict():
    assert set(ALL_OPS) == {"cpu_adam", "cpu_adagrad", "cpu_lion", "fused_adam", "async_io", "async_io_uring",
                            "cpu_attention", "flash_attn"}
    for name in ALL_OPS:
        compat = get_builder(name).is_compatible()
        assert bool(compat) == (compat.reason == "")
    with pytest.raises(ValueError, match="unknown op"):
        get_builder("no_such_op")


@needs_cxx
def test_second_load_is_served_from_cache():
    get_builder("cpu_adam").load()  # built (once per session) in the session cache
    result = run_python(textwrap.dedent("""
        import sys, time, torch
        start = time.perf_counter()
        from op_builder import get_builder
        lib = get_builder("cpu_adam").load()
        elapsed = time.perf_counter() - start
        print("ELAPSED", elapsed, "NINJA_USED", "torch.utils.cpp_extension" in sys.modules)
    """))
    assert result.returncode == 0, result.stderr
    fields = result.stdout.split()
    elapsed = float(fields[fields.index("ELAPSED") + 1])
    assert elapsed < 1.0
    assert fields[fields.index("NINJA_USED") + 1] == "False"  # no build machinery touched
    assert "built op" not in result.stdout


@needs_cxx
def test_two_processes_building_concurrently_both_succeed(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    cache = tmp_path / "cache"
    code = _tiny_builder_code(source, "tiny_concurrent") + textwrap.dedent("""
        lib = TinyBuilder().load()
        print("RESULT", lib.ds_tiny_add_one(41))
    """)
    results = [None, None]

    def worker(i):
        results[i] = run_python(code, {"DEEPSCALE_OP_CACHE": str(cache)})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.returncode == 0, r.stderr
        assert "RESULT 42" in r.stdout
    # The lock makes exactly one of them build; the other loads the finished build.
    assert sum("built op 'tiny_concurrent'" in r.stdout for r in results) == 1
    # The builder says it is building (a first build can take minutes), then how long it took.
    assert sum("building op 'tiny_concurrent'" in r.stdout for r in results) == 1


@needs_cxx
def test_failed_build_shows_the_compiler_error(tmp_path, monkeypatch):
    source = tmp_path / "broken.cpp"
    source.write_text(BROKEN_SOURCE)
    monkeypatch.setenv("DEEPSCALE_OP_CACHE", str(tmp_path / "cache"))

    class BrokenBuilder(OpBuilder):
        NAME = "tiny_broken"

        def sources(self):
            return [str(source)]

    with pytest.raises(OpBuildError) as info:
        BrokenBuilder().load()
    message = str(info.value)
    assert "undefined_name_42" in message and "error" in message
    assert "Traceback" not in message and "subprocess" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__

    # Through load_op the failure becomes one warning and a None (the fallback).
    monkeypatch.setitem(ALL_OPS, "tiny_broken", BrokenBuilder)
    warnings = []
    monkeypatch.setattr(op_loader.logger, "warning", warnings.append)
    op_loader._STATUS.pop("tiny_broken", None)
    assert op_loader.load_op("tiny_broken") is None
    assert op_loader.load_op("tiny_broken") is None
    assert len(warnings) == 1
    assert "op 'tiny_broken' is not available (build failed:" in warnings[0]
    assert "undefined_name_42" in warnings[0]


def test_no_compiler_falls_back_with_one_line_reason(tmp_path):
    code = textwrap.dedent("""
        import torch
        from deepscale.ops.adam import DeepScaleCPUAdam
        p = torch.zeros(5); p.grad = torch.ones(5)
        opt = DeepScaleCPUAdam([p], lr=0.1)
        DeepScaleCPUAdam([torch.zeros(1)])  # a second optimizer: no second warning
        opt.step()
        print("COMPILED", opt.uses_compiled_op, "VALUE", round(p[0].item(), 4))
    """)
    result = run_python(code, {"PATH": str(tmp_path), "DEEPSCALE_OP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "COMPILED False VALUE -0.1" in result.stdout
    warnings = [ln for ln in result.stdout.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1
    assert "op 'cpu_adam' is not available (no C++ compiler" in warnings[0]
    assert "using the PyTorch implementation" in warnings[0]


def test_disable_ops_forces_the_fallback(monkeypatch):
    monkeypatch.setenv("DEEPSCALE_DISABLE_OPS", "cpu_lion")
    monkeypatch.setattr(op_loader.logger, "warning", lambda msg: None)
    op_loader._STATUS.pop("cpu_lion", None)
    try:
        assert op_loader.load_op("cpu_lion") is None
        assert op_loader.op_status("cpu_lion") == (False, "disabled by DEEPSCALE_DISABLE_OPS")
    finally:
        op_loader._STATUS.pop("cpu_lion", None)


@needs_cxx
def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    monkeypatch.setenv("DEEPSCALE_OP_CACHE", str(tmp_path / "cache"))

    class TinyBuilder(OpBuilder):
        NAME = "tiny_damaged"

        def sources(self):
            return [str(source)]

    builder = TinyBuilder()
    builder.load()
    marker = builder.build_dir() / "built.json"
    info = json.loads(marker.read_text())
    info["path"] = str(tmp_path / "missing.so")
    marker.write_text(json.dumps(info))
    from op_builder import builder as builder_module
    builder_module._LOADED.clear()
    assert builder.load().ds_tiny_add_one(1) == 2
    assert os.path.exists(json.loads(marker.read_text())["path"])


@needs_cxx
def test_cuda_major_mismatch_and_missing_nvcc_are_reasons(monkeypatch):
    import torch

    from op_builder import fused_adam
    monkeypatch.setattr(fused_adam, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(fused_adam, "_nvcc_version", lambda nvcc: (13, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    compat = fused_adam.FusedAdamBuilder().is_compatible()
    assert not compat and "CUDA major mismatch" in compat.reason and "12.4" in compat.reason
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert fused_adam.FusedAdamBuilder().is_compatible()
    monkeypatch.setattr(fused_adam, "find_nvcc", lambda: None)
    assert "no nvcc" in fused_adam.FusedAdamBuilder().is_compatible().reason


@needs_cxx
def test_missing_libaio_headers_is_a_reason(monkeypatch):
    from op_builder import async_io
    monkeypatch.setattr(async_io, "find_libaio_header", lambda: None)
    compat = async_io.AsyncIOBuilder().is_compatible()
    assert not compat and "no libaio headers" in compat.reason
