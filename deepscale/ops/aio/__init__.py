"""Async tensor file I/O (the NVMe offload path): io_uring or libaio with O_DIRECT, or a Python thread pool.

Typical use::

    handle = AsyncIOHandle(block_size=1 << 20, queue_depth=8, thread_count=2)  # backend="auto"
    handle.async_pwrite(tensor, "/nvme/t.bin"); ...; handle.wait()

``backend=`` (or ``DEEPSCALE_AIO_BACKEND``) picks ``io_uring``, ``libaio`` or ``python``; see docs/aio.md.
"""
from deepscale.ops.aio.buffers import aligned_empty, free_cpu_locked_tensor, is_aligned, new_cpu_locked_tensor
from deepscale.ops.aio.config import AioConfig
from deepscale.ops.aio.handle import AsyncIOHandle, aio_handle
from op_builder import AsyncIOBuilder

__all__ = ["AsyncIOHandle", "aio_handle", "AsyncIOBuilder", "AioConfig", "aligned_empty", "is_aligned", "new_cpu_locked_tensor",
           "free_cpu_locked_tensor"]
