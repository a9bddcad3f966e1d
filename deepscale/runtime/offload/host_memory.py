"""Host buffers for offloaded state: pinned when asked and possible, pageable otherwise.

Pinned (page-locked) memory lets device<->host copies run asynchronously at full bus speed.
Containers, WSL and low ``RLIMIT_MEMLOCK`` often refuse it; then the buffer is allocated
pageable and one warning says so (copies still work, only slower and synchronous).
"""
import ctypes
import ctypes.util

import torch

from deepscale.ops.aio.buffers import aligned_empty
from deepscale.utils.logging import logger

_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(f"offload: pinned host memory is not available ({reason}); using pageable buffers, so "
                       "device<->host copies are slower and not asynchronous")


def _lock_pages(tensor: torch.Tensor) -> bool:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return True
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.mlock(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(nbytes)) == 0


def host_empty(numel: int, dtype: torch.dtype = torch.float32, pin: bool = False) -> torch.Tensor:
    """An uninitialised 1-D host tensor, page-locked when ``pin`` and the platform allows it.

    Args:
        numel: elements.
        dtype: element type. Default float32.
        pin: ask for pinned memory (CUDA pinned when CUDA is present, ``mlock`` otherwise).
    """
    if not pin:
        return torch.empty(int(numel), dtype=dtype)
    if torch.cuda.is_available():
        try:
            return torch.empty(int(numel), dtype=dtype, pin_memory=True)
        except RuntimeError as err:
            _warn_once(str(err).splitlines()[0])
            return torch.empty(int(numel), dtype=dtype)
    out = aligned_empty(int(numel), dtype=dtype)
    if not _lock_pages(out):
        _warn_once("mlock refused, see ulimit -l (RLIMIT_MEMLOCK)")
    return out


def host_zeros(numel: int, dtype: torch.dtype = torch.float32, pin: bool = False) -> torch.Tensor:
    """:func:`host_empty`, zero-filled."""
    return host_empty(numel, dtype, pin).zero_()


def host_copy(tensor: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """A 1-D fp32 host copy of ``tensor`` (flattened)."""
    out = host_empty(tensor.numel(), torch.float32, pin)
    out.copy_(tensor.detach().reshape(-1))
    return out
