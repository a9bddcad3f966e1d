"""Where offloaded parameter shards live between uses: host memory or NVMe swap files.

Both stores keep one shard per parameter group, addressed by the group's index, and copy it
into or out of the group's device-side shard buffer on request. :class:`HostShardStore` holds
every shard in host memory (``offload_param.device='cpu'``). :class:`NvmeShardStore` keeps them
in swap files and moves them through ``buffer_count`` staging buffers, each with its own async
I/O handle so that one buffer's read can be waited on while the others' stay in flight.
"""
import ctypes
import ctypes.util
import time
from typing import Dict, List, Optional

import torch

from deepscale.ops.aio import AsyncIOHandle, aligned_empty
from deepscale.runtime.offload.param_swap_file import ParamSwapDirectory
from deepscale.utils.logging import warning_once

_libc = None


def _mlock(tensor: torch.Tensor) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    nbytes = tensor.numel() * tensor.element_size()
    return nbytes == 0 or _libc.mlock(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(nbytes)) == 0


def host_buffer(numel: int, dtype: torch.dtype, pin: bool, what: str) -> torch.Tensor:
    """An aligned host tensor, page-locked when ``pin`` and the system allows it.

    Pinning that cannot be had (``RLIMIT_MEMLOCK`` in containers, no CUDA host registration)
    falls back to pageable memory with one warning per process.
    """
    if pin and torch.cuda.is_available():
        try:
            return aligned_empty(numel, dtype=dtype, pin=True)
        except RuntimeError as exc:
            warning_once(f"offload_param.pin_memory: could not pin {what} ({exc}); using pageable memory")
            return aligned_empty(numel, dtype=dtype)
    buffer = aligned_empty(numel, dtype=dtype)
    if pin and not _mlock(buffer):
        warning_once(f"offload_param.pin_memory: could not lock {what} in memory (RLIMIT_MEMLOCK; "
                     f"`ulimit -l` raises it); using pageable memory")
    return buffer


class HostShardStore:
    """Every shard in host memory (pinned when asked and possible)."""

    kind = "cpu"

    def __init__(self, pin: bool):
        self.pin = pin
        self.shards: Dict[int, torch.Tensor] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shards.values())

    def put(self, key: int, src: torch.Tensor) -> None:
        if key not in self.shards:
            self.shards[key] = host_buffer(src.numel(), src.dtype, self.pin, "parameter shards")
        self.shards[key].copy_(src)

    def load(self, key: int, dest: torch.Tensor) -> None:
        dest.copy_(self.shards[key], non_blocking=dest.device.type != "cpu")

    def flush(self) -> Optional[str]:
        return None

    def close(self) -> None:
        self.shards.clear()


class _Slot:
    """One staging buffer with its I/O handle and what it holds."""

    def __init__(self, buffer: torch.Tensor, handle: AsyncIOHandle):
        self.buffer, self.handle = buffer, handle
        self.key: Optional[int] = None
        self.op: Optional[str] = None  # None (free), "read" or "write"


class NvmeShardStore:
    """Shards in swap files, moved through ``buffer_count`` staging buffers.

    Args:
        directory: the rank's swap directory.
        buffer_count: staging buffers (``offload_param.buffer_count``).
        slot_numel: elements per staging buffer (the largest padded shard).
        dtype: shard dtype.
        pin: page-lock the staging buffers.
        aio: keyword arguments of :class:`~deepscale.ops.aio.AsyncIOHandle` (the ``aio`` section).
    """

    kind = "nvme"

    def __init__(self, directory: ParamSwapDirectory, buffer_count: int, slot_numel: int, dtype: torch.dtype,
                 pin: bool, aio: dict):
        self.dir, self.dtype = directory, dtype
        self.numel: Dict[int, int] = {}
        self.slots: List[_Slot] = [_Slot(host_buffer(slot_numel, dtype, pin, "parameter swap buffers"),
                                         AsyncIOHandle(**aio)) for _ in range(buffer_count)]
        self.write_errors: List[str] = []
        self.bytes_read = self.bytes_written = 0
        self.loads_read_ahead = self.loads_on_demand = 0  # how loads found their shard
        self.load_wait_s = 0.0  # time loads spent waiting for reads (what read-ahead did not hide)

    def _padded_view(self, slot: _Slot, key: int) -> torch.Tensor:
        itemsize = slot.buffer.element_size()
        return slot.buffer[:self.dir.padded(self.numel[key] * itemsize) // itemsize]

    def _nbytes(self, key: int) -> int:
        return self.numel[key] * self.slots[0].buffer.element_size()

    # --- slots ----------------------------------------------------------------------------
    def _finish(self, slot: _Slot) -> None:
        op, slot.op = slot.op, None
        try:
            slot.handle.wait()
        except OSError as exc:
            if op != "write":
                raise
            self.write_errors.append(str(exc))
        if op == "write":
            slot.key = None

    def _free_slot(self) -> _Slot:
        """A free slot: an idle one, else the oldest write finished, else a read-ahead dropped."""
        for slot in self.slots:
            if slot.op is None and slot.key is None:
                return slot
        for wanted in ("write", "read"):
            for slot in self.slots:
                if slot.op == wanted:
                    self._finish(slot)
                    slot.key = None
                    return slot
        for slot in self.slots:  # a finished read nobody consumed
            if slot.op is None:
                slot.key = None
                return slot
        raise AssertionError("no staging buffer")

    def _slot_of(self, key: int) -> Optional[_Slot]:
        for slot in self.slots:
            if slot.key == key and slot.op != "write":
                return slot
        return None

    @property
    def num_free(self) -> int:
        return sum(1 for s in self.slots if s.key is None and s.op is None)

    # --- reads ----------------------------------------------------------------------------
    def start_read(self, key: int) -> bool:
        """Issue the read of ``key`` into an idle staging buffer; False when none is idle (or
        the read is already issued)."""
        if self._slot_of(key) is not None:
            return False
        slot = next((s for s in self.slots if s.op is None and s.key is None), None)
        if slot is None:
            return False
        self._issue_read(slot, key)
        return True

    def _wait_writes(self, key: int) -> None:
        for slot in self.slots:
            if slot.key == key and slot.op == "write":
                self._finish(slot)

    def _issue_read(self, slot: _Slot, key: int) -> None:
        self._wait_writes(key)
        self.dir.check_readable(key, self._nbytes(key))
        slot.key, slot.op = key, "read"
        slot.handle.async_pread(self._padded_view(slot, key), self.dir.file_for(key))
        self.bytes_read += self._nbytes(key)

    def is_reading(self, key: int) -> bool:
        return self._slot_of(key) is not None

    def load(self, key: int, dest: torch.Tensor) -> None:
        """Copy shard ``key`` into ``dest``: wait for its read-ahead, or read it now."""
        slot = self._slot_of(key)
        if slot is None:
            slot = self._free_slot()
            self._issue_read(slot, key)
            self.loads_on_demand += 1
        else:
            self.loads_read_ahead += 1
        if slot.op == "read":
            start = time.perf_counter()
            self._finish(slot)
            self.load_wait_s += time.perf_counter() - start
        self.dir.verify(key, slot.buffer)
        dest.copy_(slot.buffer[:self.numel[key]], non_blocking=dest.device.type != "cpu")
        if dest.device.type != "cpu" and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the staging buffer is reused next
        slot.key = None

    def drop_reads(self) -> None:
        """Wait for and forget every read-ahead (a phase ended or went off its plan)."""
        for slot in self.slots:
            if slot.op == "read":
                self._finish(slot)
            if slot.op is None:
                slot.key = None

    # --- writes ---------------------------------------------------------------------------
    def put(self, key: int, src: torch.Tensor) -> None:
        """Write ``src`` as shard ``key`` (asynchronous; :meth:`flush` waits and reports errors)."""
        self.numel[key] = src.numel()
        self._wait_writes(key)  # two writes of one file must not overlap
        stale = self._slot_of(key)
        if stale is not None:  # a read-ahead of the old values
            if stale.op == "read":
                self._finish(stale)
            stale.key = None
        slot = self._free_slot()
        view = self._padded_view(slot, key)
        view[:src.numel()].copy_(src)
        view[src.numel():].zero_()
        self.dir.wrote(key, view, self._nbytes(key))
        slot.key, slot.op = key, "write"
        try:
            slot.handle.async_pwrite(view, self.dir.file_for(key))
        except OSError as exc:
            slot.key, slot.op = None, None
            self.write_errors.append(str(exc))
            return
        self.bytes_written += self._nbytes(key)

    def flush(self) -> Optional[str]:
        """Wait for every write; the first error message, or None."""
        for slot in self.slots:
            if slot.op == "write":
                self._finish(slot)
        errors, self.write_errors = self.write_errors, []
        return errors[0] if errors else None

    def close(self) -> None:
        for slot in self.slots:
            if slot.op is not None:
                try:
                    self._finish(slot)
                except OSError:
                    pass
        self.write_errors = []
        self.dir.close()
