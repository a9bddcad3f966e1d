"""Builder of the async I/O op (``deepscale.ops.aio``): libaio, O_DIRECT, a worker pool.

The engine (csrc/aio/aio_engine.cpp) is shared with the io_uring build (async_io_uring.py);
only the per-worker kernel queue differs: ``QUEUE_SOURCE`` and the library linked.
"""
import ctypes.util
import os
from pathlib import Path

from op_builder.builder import Compatibility, OpBuilder

_HEADER_DIRS = ("/usr/include", "/usr/local/include", "/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu")


def find_header(name):
    """Path of header ``name`` in the compiler's usual and configured include dirs, or None."""
    dirs = list(_HEADER_DIRS)
    for var in ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH"):
        dirs.extend(d for d in os.environ.get(var, "").split(os.pathsep) if d)
    for d in dirs:
        if Path(d, name).is_file():
            return str(Path(d, name))
    return None


def find_libaio_header():
    """Path of ``libaio.h``, or None."""
    return find_header("libaio.h")


class AsyncIOBuilder(OpBuilder):
    """Async reads/writes of tensors to files (the NVMe offload path)."""

    NAME = "async_io"
    QUEUE_SOURCE = "aio/aio_queue_libaio.cpp"

    def sources(self):
        return ["aio/aio_engine.cpp", "aio/aio_binding.cpp", self.QUEUE_SOURCE]

    def include_dirs(self):
        return ["aio"]

    def cxx_args(self):
        return ["-O2", "-std=c++17", "-Wno-unused-function"]

    def extra_ldflags(self):
        return ["-laio", "-lpthread"]

    def is_compatible(self, verbose=False):
        result = super().is_compatible(verbose)
        if not result:
            return result
        if os.name != "posix" or not Path("/proc/sys/fs/aio-max-nr").exists():
            return Compatibility(False, "kernel AIO is not available on this OS")
        if find_libaio_header() is None:
            return Compatibility(False, "no libaio headers: libaio.h not found (apt-get install libaio-dev)")
        if ctypes.util.find_library("aio") is None:
            return Compatibility(False, "no libaio library: libaio.so not found (apt-get install libaio-dev)")
        return Compatibility(True)
