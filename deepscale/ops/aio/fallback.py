"""Pure-Python async I/O engine (``os.pread``/``os.pwrite`` in threads), used without libaio.

It mirrors the compiled engine's interface (``submit`` returns an id or ``-errno``, ``wait``
returns an errno) so the handle above it does not care which one runs. No O_DIRECT: the page
cache serves these reads and writes.
"""
import ctypes
import errno as errno_codes
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor


class PythonEngine:
    """Thread-pool engine with the compiled ``Engine``'s constructor and methods."""

    backend = "python"

    def __init__(self, block_size, queue_depth, single_submit, overlap_events, num_threads, use_direct):
        self.block_size = block_size
        self.queue_depth = queue_depth
        self.single_submit = single_submit
        self.overlap_events = overlap_events
        self.num_threads = num_threads
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="deepscale-aio")
        self._requests = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def submit(self, is_read, buffer, nbytes, path, file_offset):
        try:
            write_flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if file_offset == 0 else 0)
            fd = os.open(path, os.O_RDONLY if is_read else write_flags, 0o644)
        except OSError as exc:
            return -(exc.errno or errno_codes.EIO)
        view = memoryview((ctypes.c_char * max(nbytes, 1)).from_address(buffer)).cast("B")[:nbytes]
        num_blocks = max(1, -(-nbytes // self.block_size))
        per_task = -(-num_blocks // self.num_threads) * self.block_size
        futures = [self._pool.submit(self._transfer, is_read, fd, view, start, min(nbytes, start + per_task), file_offset)
                   for start in range(0, max(nbytes, 1), per_task)]
        with self._lock:
            request_id = next(self._ids)
            self._requests[request_id] = (fd, futures)
        return request_id

    def _transfer(self, is_read, fd, view, start, end, file_offset):
        pos = start
        while pos < end:
            chunk = view[pos:min(end, pos + self.block_size)]
            if is_read:
                done = os.preadv(fd, [chunk], file_offset + pos)
                if done == 0:
                    return errno_codes.EIO  # the file ended early
            else:
                done = os.pwrite(fd, chunk, file_offset + pos)
                if done == 0:
                    return errno_codes.EIO  # no progress: never spin
            pos += done
        return 0

    def wait(self, request_id):
        with self._lock:
            if request_id not in self._requests:
                raise ValueError(f"unknown or already waited request id {request_id}")
            fd, futures = self._requests.pop(request_id)
        error = 0
        for future in futures:
            try:
                result = future.result()
            except OSError as exc:
                result = exc.errno or errno_codes.EIO
            error = error or result
        os.close(fd)
        return error
