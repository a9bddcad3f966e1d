"""Builder of the io_uring variant of the async I/O op: the same engine as ``async_io`` with
one io_uring ring per worker instead of a kernel AIO context (liburing)."""
import ctypes
import ctypes.util
import functools
import os

from op_builder.async_io import AsyncIOBuilder, find_header
from op_builder.builder import Compatibility, OpBuilder

_RING_BYTES = 4096  # more than sizeof(struct io_uring) (216 bytes in liburing 2.x)


@functools.lru_cache(maxsize=None)
def probe_io_uring():
    """None when the kernel sets up an io_uring ring here, else why not (one line).

    Calls liburing's ``io_uring_queue_init`` once per process: it fails where the kernel lacks
    io_uring, ``kernel.io_uring_disabled`` is set, or a seccomp filter (containers) refuses it.
    """
    name = ctypes.util.find_library("uring")
    if name is None:
        return "no liburing library: liburing.so not found (apt-get install liburing-dev)"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        return f"cannot load {name}: {exc}"
    ring = ctypes.create_string_buffer(_RING_BYTES)
    rc = lib.io_uring_queue_init(ctypes.c_uint(2), ring, ctypes.c_uint(0))
    if rc < 0:
        return (f"the kernel refuses io_uring (io_uring_queue_init: {os.strerror(-rc)}; disabled by "
                f"kernel.io_uring_disabled, seccomp, or a kernel older than 5.1)")
    lib.io_uring_queue_exit(ring)
    return None


class AsyncIOUringBuilder(AsyncIOBuilder):
    """Async reads/writes of tensors to files through io_uring."""

    NAME = "async_io_uring"
    QUEUE_SOURCE = "aio/aio_queue_uring.cpp"

    def extra_ldflags(self):
        return ["-luring", "-lpthread"]

    def is_compatible(self, verbose=False):
        result = OpBuilder.is_compatible(self, verbose)
        if not result:
            return result
        if os.name != "posix":
            return Compatibility(False, "io_uring is Linux only")
        if find_header("liburing.h") is None:
            return Compatibility(False, "no liburing headers: liburing.h not found (apt-get install liburing-dev)")
        reason = probe_io_uring()
        return Compatibility(reason is None, reason or "")
