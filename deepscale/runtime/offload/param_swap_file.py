"""Swap files for parameter shards on NVMe: one directory per rank, one file per parameter group.

Note: what a swap file holds. A group's shard of ``n`` bytes is written from an aligned buffer
as ``ceil(n / block_size) * block_size`` bytes, so every request the async I/O engine issues is
whole blocks (O_DIRECT needs that; a partial last block would go through the engine's bounce
buffer). The logical size is recorded in memory next to the file and checked on every read: the
file must hold at least the padded size, or the read fails naming the file and both sizes
(DeepSpeed users met silent short reads: issues 1070, 1627, 2006). In debug mode a CRC32 of the
logical bytes is recorded at each write and verified after each read.

Files live under ``<nvme_path>/deepscale_param_swap/rank<global rank>/``. The directory is
emptied when the store opens (what a crashed run left behind) and removed on :meth:`close`,
which also runs at interpreter exit.
"""
import os
import shutil
import weakref
import zlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch

SWAP_DIR_NAME = "deepscale_param_swap"


def padded_nbytes(nbytes: int, block_size: int) -> int:
    """``nbytes`` rounded up to a whole number of ``block_size`` blocks (at least one block)."""
    return max(1, -(-int(nbytes) // block_size)) * block_size


def tensor_crc32(tensor: torch.Tensor, nbytes: int) -> int:
    """CRC32 of the first ``nbytes`` bytes of a contiguous CPU tensor."""
    raw = tensor.reshape(-1).view(torch.uint8)[:nbytes]
    return zlib.crc32(raw.numpy().tobytes()) if nbytes else 0


@dataclass
class SwapRecord:
    """What was last written to one swap file."""

    path: str
    logical_nbytes: int
    padded_nbytes: int
    crc32: Optional[int] = None


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class ParamSwapDirectory:
    """The rank's swap directory and the record of each file in it.

    Args:
        nvme_path: ``offload_param.nvme_path``.
        rank: the global rank (names the directory).
        block_size: ``aio.block_size``; files are padded to a multiple of it.
        debug: record and verify a CRC32 of every file.
    """

    def __init__(self, nvme_path: str, rank: int, block_size: int, debug: bool = False):
        if not nvme_path:
            raise ValueError("zero_optimization.offload_param.device='nvme' needs offload_param.nvme_path "
                             "(a directory on a fast local disk)")
        if os.path.exists(nvme_path) and not os.path.isdir(nvme_path):
            raise ValueError(f"zero_optimization.offload_param.nvme_path={nvme_path!r} is not a directory")
        self.block_size, self.debug = int(block_size), bool(debug)
        self.path = os.path.join(nvme_path, SWAP_DIR_NAME, f"rank{rank}")
        _remove_tree(self.path)  # left over by a run that did not exit cleanly
        os.makedirs(self.path, exist_ok=True)
        self.records: Dict[int, SwapRecord] = {}
        # removes the files at interpreter exit even when close() is never called
        self._finalizer = weakref.finalize(self, _remove_tree, self.path)

    def file_for(self, key: int) -> str:
        return os.path.join(self.path, f"group{key}.swp")

    def padded(self, nbytes: int) -> int:
        return padded_nbytes(nbytes, self.block_size)

    def free_bytes(self) -> int:
        """Free space on the file system of the swap directory."""
        return shutil.disk_usage(self.path).free

    def wrote(self, key: int, buffer: torch.Tensor, logical_nbytes: int) -> None:
        """Record that ``buffer`` (padded) was written as file ``key`` holding ``logical_nbytes``."""
        crc = tensor_crc32(buffer, logical_nbytes) if self.debug else None
        self.records[key] = SwapRecord(self.file_for(key), logical_nbytes, self.padded(logical_nbytes), crc)

    def check_readable(self, key: int, logical_nbytes: int) -> SwapRecord:
        """The record of file ``key``; raises when it was never written, holds another size or is short."""
        record = self.records.get(key)
        if record is None:
            raise RuntimeError(f"parameter swap file {self.file_for(key)} was never written")
        if record.logical_nbytes != logical_nbytes:
            raise RuntimeError(f"parameter swap file {record.path} holds {record.logical_nbytes} bytes, "
                               f"{logical_nbytes} were asked for")
        size = os.stat(record.path).st_size
        if size < record.padded_nbytes:
            raise RuntimeError(f"parameter swap file {record.path} is short: {size} bytes on disk, "
                               f"{record.padded_nbytes} written (logical size {record.logical_nbytes})")
        return record

    def verify(self, key: int, buffer: torch.Tensor) -> None:
        """Debug mode: the bytes just read into ``buffer`` match what was written."""
        record = self.records[key]
        if record.crc32 is None:
            return
        got = tensor_crc32(buffer, record.logical_nbytes)
        if got != record.crc32:
            raise RuntimeError(f"parameter swap file {record.path}: the {record.logical_nbytes} bytes read back "
                               f"differ from those written (crc32 {got:#010x}, expected {record.crc32:#010x})")

    def close(self) -> None:
        """Remove the directory and its files."""
        self.records.clear()
        self._finalizer()
