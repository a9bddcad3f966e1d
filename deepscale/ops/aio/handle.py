"""``AsyncIOHandle``: read and write tensors to files, synchronously or in the background.

A compiled engine (O_DIRECT, one kernel queue per worker thread: the ``async_io_uring`` op over
io_uring, or the ``async_io`` op over libaio) does the work when it can be built and started;
otherwise a thread pool of ``os.pread``/``os.pwrite`` calls does, with the same methods and the
same errors (see ``backends.py`` for the choice). Errors surface as ``OSError`` carrying the
file path.
"""
import os
import threading

import torch

from deepscale.ops.aio.backends import open_engine, requested_backend
from deepscale.ops.aio.buffers import free_cpu_locked_tensor, new_cpu_locked_tensor
from deepscale.ops.aio.config import AioConfig
from deepscale.utils.logging import logger


def _raise_for(err, path, is_read):
    if err:
        verb = "read" if is_read else "write"
        # OSError appends the path to its message: "[Errno 28] async I/O write failed: ...: '<path>'".
        raise OSError(err, f"async I/O {verb} failed: {os.strerror(err)}", str(path))


class AsyncIOHandle:
    """A pool of I/O workers that moves tensors to and from files.

    Args:
        block_size: bytes per I/O request (multiple of 4096). Default 1 MiB.
        queue_depth: requests in flight per worker. Default 8.
        single_submit: one request per submit call. Default False.
        overlap_events: overlap submission and completion. Default True.
        thread_count: worker threads. Default 1.
        use_direct: open files with O_DIRECT (bypass the page cache). Default True.
        backend: ``"auto"`` (io_uring, else libaio, else Python: the first that builds and
            starts here), ``"io_uring"``, ``"libaio"`` or ``"python"`` (exactly that engine), or
            ``"native"`` (io_uring, else libaio; never Python). Default None: the
            ``DEEPSCALE_AIO_BACKEND`` environment variable, else ``"auto"``. The engine in use
            is ``handle.backend``.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: the requested backend cannot run here (with the reason).
    """

    def __init__(self, block_size=1 << 20, queue_depth=8, single_submit=False, overlap_events=True, thread_count=1,
                 use_direct=True, backend=None):
        self.config = AioConfig(block_size=block_size, queue_depth=queue_depth, thread_count=thread_count,
                                single_submit=single_submit, overlap_events=overlap_events)
        args = (block_size, queue_depth, single_submit, overlap_events, thread_count, bool(use_direct))
        self._engine = open_engine(requested_backend(backend), args)
        self.backend = self._engine.backend  # "io_uring", "libaio" or "python"
        self._pending = []  # (request id, path, is_read, tensor kept alive, finish callback)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, aio_section, **kwargs):
        """A handle from a DeepSpeed ``aio`` config dict."""
        cfg = AioConfig.from_dict(aio_section)
        return cls(block_size=cfg.block_size, queue_depth=cfg.queue_depth, single_submit=cfg.single_submit,
                   overlap_events=cfg.overlap_events, thread_count=cfg.thread_count, **kwargs)

    # --- DeepSpeed-style getters ----------------------------------------------------------
    def get_block_size(self):
        return self.config.block_size

    def get_queue_depth(self):
        return self.config.queue_depth

    def get_single_submit(self):
        return self.config.single_submit

    def get_overlap_events(self):
        return self.config.overlap_events

    def get_thread_count(self):
        return self.config.thread_count

    get_intra_op_parallelism = get_thread_count

    new_cpu_locked_tensor = staticmethod(new_cpu_locked_tensor)
    free_cpu_locked_tensor = staticmethod(free_cpu_locked_tensor)

    # --- requests -------------------------------------------------------------------------
    def _host_view(self, tensor, is_read):
        """The host tensor the engine touches, plus a callback that finishes device reads."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"buffer must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            return tensor, None
        staging = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                              pin_memory=torch.cuda.is_available())
        if not is_read:
            staging.copy_(tensor)
            return staging, None
        return staging, lambda: tensor.copy_(staging)

    def _submit(self, is_read, tensor, path, file_offset):
        path = os.fspath(path)
        if file_offset < 0:
            raise ValueError(f"file_offset must be >= 0, got {file_offset}")
        host, finish = self._host_view(tensor, is_read)
        nbytes = host.numel() * host.element_size()
        if is_read:
            size = os.stat(path).st_size  # FileNotFoundError names the path
            if size < file_offset + nbytes:
                raise ValueError(f"{path} holds {size} bytes, fewer than the {file_offset + nbytes} needed to fill "
                                 f"a tensor of {nbytes} bytes at offset {file_offset}")
        request_id = self._engine.submit(is_read, host.data_ptr(), nbytes, path, file_offset)
        if request_id < 0:
            _raise_for(-request_id, path, is_read)
        with self._lock:
            self._pending.append((request_id, path, is_read, host, finish))
        return request_id

    def wait(self):
        """Wait for every outstanding request; return how many completed.

        Raises:
            OSError: the first failed request's error, with its path (after all have finished).
        """
        with self._lock:
            pending, self._pending = self._pending, []
        first_error = None
        for request_id, path, is_read, _host, finish in pending:
            err = self._engine.wait(request_id)
            if err and first_error is None:
                first_error = (err, path, is_read)
            elif not err and finish is not None:
                finish()
        if first_error is not None:
            _raise_for(*first_error)
        return len(pending)

    def __del__(self):
        # Requests still in flight write into tensors this handle keeps alive; finish them
        # before those references (and the engine) go away. Their errors belong to wait(),
        # which the owner skipped: log them rather than lose them (a destructor cannot raise).
        try:
            if self._pending:
                self.wait()
        except OSError as exc:
            logger.error(f"AsyncIOHandle destroyed with requests nobody waited for; one failed: {exc}")
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def pread(self, buffer, filename, validate=False, async_op=False, file_offset=0):
        """Read ``filename`` (from ``file_offset``) into ``buffer``; asynchronous if ``async_op``.

        ``validate`` is accepted for DeepSpeed compatibility and has no effect.
        """
        self._submit(True, buffer, filename, file_offset)
        return 0 if async_op else self.wait()

    def pwrite(self, buffer, filename, validate=False, async_op=False, file_offset=0):
        """Write ``buffer`` to ``filename`` (at ``file_offset``); asynchronous if ``async_op``.

        At offset 0 the file is replaced (truncated to the tensor's size); at a positive offset
        only that range of the file changes.
        """
        self._submit(False, buffer, filename, file_offset)
        return 0 if async_op else self.wait()

    def sync_pread(self, buffer, filename, file_offset=0):
        """Read and wait; returns the number of completed requests."""
        return self.pread(buffer, filename, file_offset=file_offset)

    def sync_pwrite(self, buffer, filename, file_offset=0):
        """Write and wait; returns the number of completed requests."""
        return self.pwrite(buffer, filename, file_offset=file_offset)

    def async_pread(self, buffer, filename, file_offset=0):
        """Queue a read; call :meth:`wait` before using ``buffer``. Returns 0."""
        return self.pread(buffer, filename, async_op=True, file_offset=file_offset)

    def async_pwrite(self, buffer, filename, file_offset=0):
        """Queue a write; keep ``buffer`` unchanged until :meth:`wait`. Returns 0."""
        return self.pwrite(buffer, filename, async_op=True, file_offset=file_offset)


def aio_handle(block_size=1 << 20, queue_depth=8, single_submit=False, overlap_events=True, intra_op_parallelism=1):
    """DeepSpeed's ``aio_handle(...)`` constructor spelling; returns an :class:`AsyncIOHandle`."""
    return AsyncIOHandle(block_size=block_size, queue_depth=queue_depth, single_submit=single_submit,
                         overlap_events=overlap_events, thread_count=intra_op_parallelism)


__all__ = ["AsyncIOHandle", "aio_handle"]
