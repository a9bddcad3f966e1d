"""Swap files on NVMe: one directory per rank, block-padded files, checked sizes, clean removal.

This is the shared machinery of optimizer-state and parameter swapping. Its API is small:

    files = SwapFiles(nvme_path, "optimizer", rank, aio_config, debug=False)
    numel = files.padded_numel(n, dtype)        # allocate buffers this long
    files.write("sg3.exp_avg", buffer, logical_numel=n)   # asynchronous
    files.read("sg3.exp_avg", buffer, logical_numel=n)    # asynchronous
    files.wait()   # or wait_reads()/wait_writes(); raises SwapSpaceError / OSError naming the file
    files.close()                               # removes the directory (also at exit)

Note: why padding and recorded sizes. O_DIRECT I/O moves whole blocks, so every file is written
as a multiple of ``aio.block_size`` bytes from a buffer at least that long; the logical length
(what the caller meant) is recorded per file. A read asks for the padded length, and in debug
mode (``DEEPSCALE_OFFLOAD_DEBUG=1`` or ``zero_optimization.debug_sequence_check``) also checks the
file's size on disk and a CRC of its bytes against what was written, so a short or stale read is
an error naming the file rather than silently wrong optimizer state (DeepSpeed issues 1070, 1627,
2006). The directory ``<nvme_path>/deepscale_swap/<tag>/rank<r>`` is removed when the owner is
closed or collected, at interpreter exit, and (left over by a crashed run) when the next run
opens it.
"""
import errno
import os
import shutil
import weakref
import zlib
from typing import Dict, Optional, Tuple

import torch

from deepscale.ops.aio import AioConfig, AsyncIOHandle

SWAP_DIR_NAME = "deepscale_swap"


class SwapSpaceError(OSError):
    """The disk under ``nvme_path`` is full (or over quota) while writing swap files."""


def swap_directory(nvme_path: str, tag: str, rank: int) -> str:
    """``<nvme_path>/deepscale_swap/<tag>/rank<rank>``: where :class:`SwapFiles` keeps its files."""
    return os.path.join(os.fspath(nvme_path), SWAP_DIR_NAME, tag, f"rank{rank}")


class SwapFiles:
    """The swap files of one rank and one purpose (``tag``), over one async I/O handle.

    Args:
        nvme_path: base directory (``offload_optimizer.nvme_path``).
        tag: purpose, e.g. ``"optimizer"`` or ``"param"`` (separate directories).
        rank: this process's global rank.
        aio: the ``aio`` settings (block size, queue depth, threads). Default ``AioConfig()``.
        debug: verify sizes and CRCs on read. Default False.
    """

    def __init__(self, nvme_path: str, tag: str, rank: int, aio: Optional[AioConfig] = None, debug: bool = False):
        self.aio = aio or AioConfig()
        self.directory = swap_directory(nvme_path, tag, rank)
        self.debug = bool(debug)
        shutil.rmtree(self.directory, ignore_errors=True)  # left over by a crashed run
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the swap directory {self.directory} under "
                                     f"offload nvme_path={nvme_path!r}: {err.strerror}") from err
        # Reads and writes get a handle each, so waiting for a read never waits for a write
        # started behind it (write-behind, see swap_plan.py).
        self.reads, self.writes = self._handle(), self._handle()
        self._logical: Dict[str, int] = {}  # name -> logical bytes
        self._crc: Dict[str, int] = {}
        self._pending_bytes = 0
        self.bytes_read = self.bytes_written = 0
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def _handle(self) -> AsyncIOHandle:
        return AsyncIOHandle(block_size=self.aio.block_size, queue_depth=self.aio.queue_depth,
                             single_submit=self.aio.single_submit, overlap_events=self.aio.overlap_events,
                             thread_count=self.aio.thread_count)

    # --- sizes ----------------------------------------------------------------------------
    def padded_numel(self, numel: int, dtype: torch.dtype) -> int:
        """Elements of ``dtype`` a buffer needs so that ``numel`` of them fill whole blocks."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        block = self.aio.block_size
        nbytes = -(-int(numel) * itemsize // block) * block
        return -(-nbytes // itemsize)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name + ".swp")

    def exists(self, name: str) -> bool:
        return name in self._logical

    def _checked(self, buffer: torch.Tensor, logical_numel: int) -> Tuple[torch.Tensor, int]:
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise ValueError("swap buffers must be contiguous host tensors")
        padded = self.padded_numel(logical_numel, buffer.dtype)
        if buffer.numel() < padded:
            raise ValueError(f"swap buffer of {buffer.numel()} elements is shorter than the {padded} a block-padded "
                             f"file of {logical_numel} elements needs (use SwapFiles.padded_numel)")
        return buffer[:padded], logical_numel * buffer.element_size()

    # --- I/O ------------------------------------------------------------------------------
    def write(self, name: str, buffer: torch.Tensor, logical_numel: int) -> None:
        """Start writing the first ``logical_numel`` elements of ``buffer`` (block-padded) to file ``name``.

        Keep ``buffer`` unchanged until :meth:`wait`.
        """
        view, nbytes = self._checked(buffer, logical_numel)
        self._logical[name] = nbytes
        if self.debug:
            self._crc[name] = zlib.crc32(view[:logical_numel].view(torch.uint8).numpy())
        self.writes.async_pwrite(view, self.path(name))
        self.bytes_written += view.numel() * view.element_size()

    def read(self, name: str, buffer: torch.Tensor, logical_numel: int) -> None:
        """Start reading file ``name`` into ``buffer`` (its first ``logical_numel`` elements are meaningful)."""
        if name not in self._logical:
            raise KeyError(f"swap file {self.path(name)} was never written")
        view, nbytes = self._checked(buffer, logical_numel)
        if nbytes != self._logical[name]:
            raise ValueError(f"swap file {self.path(name)} holds {self._logical[name]} logical bytes but a read of "
                             f"{nbytes} was asked for")
        if self.debug:
            on_disk = os.stat(self.path(name)).st_size
            if on_disk != view.numel() * view.element_size():
                raise OSError(errno.EIO, f"swap file is {on_disk} bytes on disk, expected "
                                         f"{view.numel() * view.element_size()} (short or stale write)", self.path(name))
        self.reads.async_pread(view, self.path(name))
        self.bytes_read += view.numel() * view.element_size()

    def verify(self, name: str, buffer: torch.Tensor) -> None:
        """Debug mode: check the CRC of a completed read of ``name`` into ``buffer``."""
        if not self.debug or name not in self._crc:
            return
        numel = self._logical[name] // buffer.element_size()
        if zlib.crc32(buffer[:numel].view(torch.uint8).numpy()) != self._crc[name]:
            raise OSError(errno.EIO, "swap file content differs from what was written (CRC mismatch)",
                          self.path(name))

    def wait_reads(self) -> int:
        """Wait for the reads in flight (not the writes); returns how many completed."""
        return self.reads.wait()

    def wait_writes(self) -> int:
        """Wait for the writes in flight; raises :class:`SwapSpaceError` when the disk is full."""
        try:
            return self.writes.wait()
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(self.directory).free
                raise SwapSpaceError(err.errno, f"no space left for swap files in {self.directory} "
                                                f"({free / 2**30:.2f} GiB free): give offload nvme_path a larger "
                                                f"disk, or offload fewer states (offload_optimizer.device='cpu')",
                                     err.filename) from err
            raise

    def wait(self) -> int:
        """Wait for every read and write in flight; returns how many completed.

        Raises:
            SwapSpaceError: the disk is full or over quota (with the directory and free bytes).
            OSError: any other I/O error, naming the file.
        """
        try:
            done = self.wait_reads()
        finally:
            done_writes = self.wait_writes()
        return done + done_writes

    def remove(self, name: str) -> None:
        """Delete file ``name`` (no error when absent)."""
        self._logical.pop(name, None)
        self._crc.pop(name, None)
        try:
            os.remove(self.path(name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Wait for I/O in flight and remove the directory."""
        try:
            self.wait()
        finally:
            self._logical.clear()
            self._finalizer()
