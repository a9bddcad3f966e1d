"""Python face of the compiled async I/O engine (worker pool over libaio or io_uring, loaded with ctypes)."""
import ctypes
import os


class NativeEngine:
    """The compiled engine with the same methods as :class:`~deepscale.ops.aio.fallback.PythonEngine`.

    Args:
        lib: the loaded ``async_io`` or ``async_io_uring`` library.
        block_size, queue_depth, single_submit, overlap_events, num_threads, use_direct: see
            :class:`~deepscale.ops.aio.handle.AsyncIOHandle`.
    """

    def __init__(self, lib, block_size, queue_depth, single_submit, overlap_events, num_threads, use_direct):
        self._lib = lib
        self._engine = None
        lib.ds_aio_backend.restype = ctypes.c_char_p
        self.backend = lib.ds_aio_backend().decode()  # "libaio" or "io_uring"
        self._engine = lib.ds_aio_create(block_size, queue_depth, int(single_submit), int(overlap_events),
                                         num_threads, int(use_direct))
        if not self._engine:
            raise RuntimeError(f"could not start the async I/O engine: {lib.ds_last_error().decode()}")
        self.block_size, self.queue_depth, self.num_threads = block_size, queue_depth, num_threads

    def submit(self, is_read, buffer, nbytes, path, file_offset):
        """Queue a transfer; a request id, or ``-errno`` when the file cannot be opened."""
        return self._lib.ds_aio_submit(self._engine, int(is_read), buffer, nbytes, os.fsencode(path), file_offset)

    def wait(self, request_id):
        """Block until the request completes; returns its errno (0 on success)."""
        err = self._lib.ds_aio_wait(self._engine, request_id)
        if err < 0:
            raise ValueError(self._lib.ds_last_error().decode())
        return err

    def close(self):
        """Stop the workers (after in-flight requests finish) and free the engine."""
        if self._engine:
            self._lib.ds_aio_destroy(self._engine)
            self._engine = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
