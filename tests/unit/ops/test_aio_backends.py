"""Async I/O backend choice: io_uring -> libaio -> Python fallback, explicit requests, the env var."""
import logging

import pytest
import torch

from _ops_test_helpers import needs_cxx
from deepscale.ops.aio import AsyncIOHandle, backends
from deepscale.ops.op_loader import reset_op_cache
from deepscale.utils.logging import logger
from op_builder import async_io_uring, get_builder

LIBAIO = get_builder("async_io").is_compatible()
needs_libaio = pytest.mark.skipif(not LIBAIO, reason=f"async_io: {LIBAIO.reason}")


@pytest.fixture
def warnings_seen():
    """The messages the deepscale logger warns while the test runs."""
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    reset_op_cache()
    yield seen
    logger.removeHandler(handler)
    reset_op_cache()


@pytest.fixture
def no_io_uring(monkeypatch, request):
    """Make the kernel probe report io_uring as refused (a reason unique to the test).

    The liburing header is reported present, so the probe decides on machines without
    liburing-dev too (nothing is compiled: the op is refused before a build)."""
    reason = f"the kernel refuses io_uring (test {request.node.name})"
    real_find_header = async_io_uring.find_header
    monkeypatch.setattr(async_io_uring, "find_header",
                        lambda name: f"/usr/include/{name}" if name == "liburing.h" else real_find_header(name))
    monkeypatch.setattr(async_io_uring, "probe_io_uring", lambda: reason)
    monkeypatch.delenv("DEEPSCALE_AIO_BACKEND", raising=False)
    return reason


def _round_trip(handle, tmp_path):
    tensor = torch.arange(5000, dtype=torch.float32)
    handle.sync_pwrite(tensor, tmp_path / "t.bin")
    back = torch.empty_like(tensor)
    handle.sync_pread(back, tmp_path / "t.bin")
    assert torch.equal(back, tensor)


@needs_libaio
def test_auto_falls_back_to_libaio_with_one_warning(no_io_uring, warnings_seen, tmp_path):
    handle = AsyncIOHandle(block_size=8192)
    assert handle.backend == "libaio"
    _round_trip(handle, tmp_path)
    named = [m for m in warnings_seen if "async_io_uring" in m]
    assert len(named) == 1 and no_io_uring in named[0] and "libaio" in named[0]
    AsyncIOHandle(block_size=8192)
    assert len([m for m in warnings_seen if "async_io_uring" in m]) == 1  # once per process


@needs_cxx
def test_auto_falls_back_to_python_when_neither_op_runs(no_io_uring, warnings_seen, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSCALE_DISABLE_OPS", "async_io")
    handle = AsyncIOHandle(block_size=8192)
    assert handle.backend == "python"
    _round_trip(handle, tmp_path)
    assert any("async_io_uring" in m and no_io_uring in m for m in warnings_seen)
    assert any("'async_io'" in m and "DEEPSCALE_DISABLE_OPS" in m for m in warnings_seen)


@needs_libaio
def test_a_ring_the_kernel_refuses_at_start_falls_back(monkeypatch, warnings_seen, tmp_path):
    if not get_builder("async_io_uring").is_compatible():
        pytest.skip("io_uring is not usable here")
    real = backends.NativeEngine

    def refuse_rings(lib, *args):
        engine = real(lib, *args)
        if engine.backend == "io_uring":
            engine.close()
            raise RuntimeError("could not start the async I/O engine: io_uring_queue_init failed: test")
        return engine

    monkeypatch.setattr(backends, "NativeEngine", refuse_rings)
    handle = AsyncIOHandle(block_size=8192, backend="native")
    assert handle.backend == "libaio"
    _round_trip(handle, tmp_path)
    assert any("io_uring_queue_init failed: test" in m for m in warnings_seen)
    with pytest.raises(RuntimeError, match="io_uring_queue_init failed: test"):
        AsyncIOHandle(backend="io_uring")


@needs_cxx
def test_an_explicit_backend_that_cannot_run_names_the_reason_and_choices(no_io_uring, warnings_seen):
    with pytest.raises(RuntimeError) as info:
        AsyncIOHandle(backend="io_uring")
    message = str(info.value)
    assert no_io_uring in message and "'libaio'" in message and "'python'" in message
    assert not warnings_seen  # an explicit request fails loudly instead of warning and falling back


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'io_uring', 'libaio'"):
        AsyncIOHandle(backend="uring")
    monkeypatch.setenv("DEEPSCALE_AIO_BACKEND", "spdk")
    with pytest.raises(ValueError, match="DEEPSCALE_AIO_BACKEND must be one of .*'spdk'"):
        AsyncIOHandle()


def test_env_var_chooses_and_the_argument_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSCALE_AIO_BACKEND", "python")
    assert AsyncIOHandle().backend == "python"
    assert AsyncIOHandle.from_config({"block_size": 8192}).backend == "python"
    if LIBAIO:
        assert AsyncIOHandle(backend="libaio").backend == "libaio"


def test_auto_prefers_io_uring_where_it_runs(monkeypatch):
    monkeypatch.delenv("DEEPSCALE_AIO_BACKEND", raising=False)
    compat = get_builder("async_io_uring").is_compatible()
    if not compat:
        pytest.skip(f"async_io_uring: {compat.reason}")
    assert AsyncIOHandle().backend == "io_uring"
    assert AsyncIOHandle(backend="native").backend == "io_uring"


@needs_cxx
def test_missing_liburing_is_a_reason(monkeypatch):
    monkeypatch.setattr(async_io_uring, "find_header", lambda name: None)
    compat = async_io_uring.AsyncIOUringBuilder().is_compatible()
    assert not compat and "liburing.h" in compat.reason
