"""Async I/O: round trips, concurrency, multi-block files and errors, on every engine (io_uring,
libaio, Python); a compiled one that cannot run on this machine is skipped with the reason."""
import os
import subprocess

import pytest
import torch

from deepscale.ops.aio import AioConfig, AsyncIOHandle, aio_handle, aligned_empty, is_aligned, new_cpu_locked_tensor
from op_builder import get_builder


def _backend_param(backend, op):
    compat = get_builder(op).is_compatible()
    return pytest.param(backend, marks=pytest.mark.skipif(not compat, reason=f"{op}: {compat.reason}"))


BACKENDS = [_backend_param("io_uring", "async_io_uring"), _backend_param("libaio", "async_io"), "python"]
BLOCK = 8192  # small blocks so modest tensors span many blocks and several workers


def _handle(backend, **kwargs):
    kwargs.setdefault("block_size", BLOCK)
    kwargs.setdefault("queue_depth", 4)
    kwargs.setdefault("thread_count", 2)
    return AsyncIOHandle(backend=backend, **kwargs)


def _random(numel, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(numel, generator=gen) * 100).to(dtype)
    return torch.randint(-100, 100, (numel,), generator=gen).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel,dtype", [(1, torch.float32), (3, torch.bfloat16), (1001, torch.float16),
                                         (4096, torch.uint8), (12_345, torch.float64), (2049, torch.int32)])
def test_round_trip_odd_sizes_and_dtypes(backend, numel, dtype, tmp_path):
    handle = _handle(backend)
    assert handle.backend == backend
    tensor = _random(numel, dtype, seed=numel)
    path = tmp_path / "t.bin"
    handle.sync_pwrite(tensor, path)
    assert path.stat().st_size == tensor.numel() * tensor.element_size()
    back = torch.zeros_like(tensor)
    handle.sync_pread(back, path)
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_larger_than_one_block_with_aligned_and_unaligned_buffers(backend, tmp_path):
    handle = _handle(backend)
    numel = 10 * BLOCK + 123  # ten full blocks and a partial one
    aligned = aligned_empty(numel, torch.uint8)
    aligned.copy_(_random(numel, torch.uint8, seed=1))
    unaligned = torch.empty(numel + 1, dtype=torch.uint8)[1:]  # off by one byte: bounce path
    unaligned.copy_(aligned)
    assert is_aligned(aligned) and not is_aligned(unaligned)
    for name, src in (("a.bin", aligned), ("u.bin", unaligned)):
        handle.sync_pwrite(src, tmp_path / name)
        for dst in (aligned_empty(numel, torch.uint8), torch.empty(numel + 3, dtype=torch.uint8)[3:]):
            handle.sync_pread(dst, tmp_path / name)
            assert torch.equal(dst, aligned), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_async_requests(backend, tmp_path):
    handle = _handle(backend, thread_count=3)
    tensors = [_random(5000 + 977 * i, torch.float32, seed=i) for i in range(8)]
    for i, t in enumerate(tensors):
        assert handle.async_pwrite(t, tmp_path / f"{i}.bin") == 0
    assert handle.wait() == len(tensors)
    outs = [torch.empty_like(t) for t in tensors]
    for i, out in enumerate(outs):
        handle.async_pread(out, tmp_path / f"{i}.bin")
    assert handle.wait() == len(tensors)
    for t, out in zip(tensors, outs):
        assert torch.equal(t, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("queue_depth,single_submit", [(1, True), (3, False), (64, False)])
def test_queue_depths_and_single_submit(backend, queue_depth, single_submit, tmp_path):
    handle = _handle(backend, queue_depth=queue_depth, single_submit=single_submit)
    tensor = _random(7 * BLOCK // 4 + 5, torch.float32, seed=queue_depth)  # 7 blocks and a bit
    handle.sync_pwrite(tensor, tmp_path / "q.bin")
    back = torch.empty_like(tensor)
    handle.sync_pread(back, tmp_path / "q.bin")
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_at_offset_updates_part_of_a_file(backend, tmp_path):
    handle = _handle(backend)
    whole = _random(4 * 4096, torch.uint8, seed=3)
    part = _random(4096, torch.uint8, seed=4)
    path = tmp_path / "f.bin"
    handle.sync_pwrite(whole, path)
    handle.pwrite(part, path, file_offset=4096)
    expected = whole.clone()
    expected[4096:8192] = part
    back = torch.empty_like(whole)
    handle.sync_pread(back, path)
    assert torch.equal(back, expected)
    piece = torch.empty(4096, dtype=torch.uint8)
    handle.pread(piece, path, file_offset=4096)
    assert torch.equal(piece, part)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_directory_is_an_oserror_with_the_path(backend, tmp_path):
    handle = _handle(backend)
    target = tmp_path / "no" / "such" / "dir" / "t.bin"
    with pytest.raises(FileNotFoundError) as info:
        handle.sync_pwrite(torch.ones(10), target)
    assert info.value.filename == str(target) and str(target) in str(info.value)
    with pytest.raises(FileNotFoundError):
        handle.sync_pread(torch.ones(10), target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_file_is_a_clear_error(backend, tmp_path):
    handle = _handle(backend)
    path = tmp_path / "short.bin"
    handle.sync_pwrite(torch.ones(4), path)
    with pytest.raises(ValueError, match="short.bin holds 16 bytes"):
        handle.sync_pread(torch.empty(8), path)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_disk_is_an_oserror_with_the_path(backend, small_tmpfs):
    import errno
    handle = _handle(backend)
    target = small_tmpfs / "big.bin"
    with pytest.raises(OSError) as info:
        handle.sync_pwrite(torch.ones(1 << 20, dtype=torch.uint8), target)  # 1 MiB into 256 KiB
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target) and str(target) in str(info.value)
    target.unlink()
    handle.sync_pwrite(torch.ones(1000), small_tmpfs / "small.bin")  # the handle still works afterwards


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_async_write_is_reported_at_wait_on_a_full_disk(backend, small_tmpfs):
    import errno
    handle = _handle(backend)
    target = small_tmpfs / "sparse.bin"
    with open(target, "wb") as f:
        f.truncate(4 << 20)  # 4 MiB with no blocks: nothing to reserve at submit, the writes fail
    assert handle.async_pwrite(torch.ones(1 << 20, dtype=torch.uint8), target, file_offset=4096) == 0
    with pytest.raises(OSError) as info:
        handle.wait()
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target) and str(target) in str(info.value)
    assert handle.wait() == 0  # reported once, nothing left pending
    target.unlink()
    handle.sync_pwrite(torch.ones(1000), small_tmpfs / "small.bin")  # the handle still works afterwards


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_async_write_to_a_device_is_reported_at_wait(backend, tmp_path):
    import errno
    handle = _handle(backend)
    good = tmp_path / "good.bin"
    # /dev/full accepts the open and fails every write with ENOSPC, in the background.
    assert handle.async_pwrite(torch.ones(3 * BLOCK), "/dev/full") == 0
    assert handle.async_pwrite(torch.arange(100.0), good) == 0
    with pytest.raises(OSError) as info:
        handle.wait()
    # Kernel AIO refuses a character device (EINVAL from io_submit, in the worker); the others
    # get ENOSPC from the write. Both must come out of wait(), naming the file.
    assert info.value.errno in (errno.ENOSPC, errno.EINVAL) and info.value.filename == "/dev/full"
    back = torch.empty(100)
    handle.sync_pread(back, good)  # the other request of the same wait() completed
    assert torch.equal(back, torch.arange(100.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropping_a_handle_with_a_failed_write_logs_the_error(backend, monkeypatch):
    from deepscale.ops.aio import handle as handle_module
    messages = []
    monkeypatch.setattr(handle_module.logger, "error", messages.append)
    handle = _handle(backend)
    handle.async_pwrite(torch.ones(BLOCK), "/dev/full")
    del handle  # never waited: the error must not vanish silently
    import gc
    gc.collect()
    assert len(messages) == 1 and "/dev/full" in messages[0] and "write failed" in messages[0]


def _non_contiguous_views(source):
    """(name, view) pairs of non-contiguous tensors with ``source``'s shape."""
    rows, cols = source.shape
    return [("transposed", torch.zeros(cols, rows, dtype=source.dtype).t()),
            ("strided", torch.zeros(rows, 2 * cols, dtype=source.dtype)[:, ::2]),
            ("column_slice", torch.zeros(rows, cols + 5, dtype=source.dtype)[:, 3:cols + 3])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("async_op", [False, True])
def test_reads_into_and_writes_from_non_contiguous_tensors(backend, async_op, tmp_path):
    handle = _handle(backend)
    source = _random(37 * 301, torch.float32, seed=8).reshape(37, 301)  # spans several blocks
    path = tmp_path / "nc.bin"
    handle.sync_pwrite(source, path)
    for name, view in _non_contiguous_views(source):
        assert not view.is_contiguous()
        handle.pread(view, path, async_op=async_op)
        if async_op:
            assert handle.wait() == 1
        assert torch.equal(view, source), f"{name}: the data read was not copied back into the view"
        view.mul_(-1)
        handle.pwrite(view, tmp_path / f"{name}.bin", async_op=async_op)
        if async_op:
            handle.wait()
        back = torch.empty_like(source)
        handle.sync_pread(back, tmp_path / f"{name}.bin")
        assert torch.equal(back, -source), f"{name}: a write from the view stored the wrong bytes"


def test_config_keys_and_validation():
    cfg = AioConfig.from_dict({"block_size": 1 << 20, "queue_depth": 16, "intra_op_parallelism": 2,
                               "single_submit": False, "overlap_events": True})
    assert (cfg.block_size, cfg.queue_depth, cfg.thread_count) == (1 << 20, 16, 2)
    with pytest.raises(ValueError, match="aio.block_size"):
        AioConfig(block_size=1000)
    with pytest.raises(ValueError, match="aio.queue_depth"):
        AioConfig(queue_depth=0)
    with pytest.raises(ValueError, match="unknown aio config key"):
        AioConfig.from_dict({"blocksize": 4096})
    with pytest.raises(ValueError, match="backend"):
        AsyncIOHandle(backend="gpu")


def test_deepspeed_style_constructor_and_locked_buffers(tmp_path):
    handle = aio_handle(block_size=BLOCK, queue_depth=2, single_submit=True, overlap_events=False,
                        intra_op_parallelism=1)
    assert (handle.get_block_size(), handle.get_queue_depth(), handle.get_single_submit(),
            handle.get_overlap_events(), handle.get_intra_op_parallelism()) == (BLOCK, 2, True, False, 1)
    buf = new_cpu_locked_tensor(3000, torch.empty(0, dtype=torch.float16))
    assert buf.dtype == torch.float16 and buf.numel() == 3000 and is_aligned(buf)
    buf.copy_(torch.arange(3000, dtype=torch.float16))
    handle.sync_pwrite(buf, tmp_path / "l.bin")
    out = new_cpu_locked_tensor(3000, buf)
    handle.sync_pread(out, tmp_path / "l.bin")
    assert torch.equal(out, buf)
    assert handle.free_cpu_locked_tensor(out)
    assert os.path.getsize(tmp_path / "l.bin") == 6000
