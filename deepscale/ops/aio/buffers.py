"""Host buffers for async I/O: page-aligned and, where possible, page-locked.

An aligned buffer lets O_DIRECT move data straight between disk and tensor; an unaligned
one still works but passes through the engine's bounce buffers.
"""
import ctypes
import ctypes.util

import torch

from deepscale.ops.aio.config import ALIGNMENT

_libc = None


def _mlock(tensor):
    """Lock the pages of ``tensor`` in RAM; returns False where the OS refuses (RLIMIT_MEMLOCK)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    nbytes = tensor.numel() * tensor.element_size()
    return nbytes == 0 or _libc.mlock(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(nbytes)) == 0


def is_aligned(tensor, alignment=ALIGNMENT):
    """True when ``tensor``'s data address is a multiple of ``alignment`` bytes."""
    return tensor.data_ptr() % alignment == 0


def aligned_empty(numel, dtype=torch.uint8, alignment=ALIGNMENT, pin=False):
    """An uninitialised 1-D CPU tensor whose data starts on an ``alignment`` boundary.

    Args:
        numel: number of elements.
        dtype: element type. Default ``torch.uint8``.
        alignment: address alignment in bytes. Default 4096.
        pin: page-lock the memory: CUDA pinned memory when CUDA is available, ``mlock`` otherwise
            (best effort). Default False.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if pin and torch.cuda.is_available():
        raw = torch.empty(nbytes + alignment, dtype=torch.uint8).pin_memory()
    else:
        raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
        if pin:
            _mlock(raw)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift:shift + nbytes].view(dtype)


def new_cpu_locked_tensor(num_elem, example_tensor):
    """A page-aligned, page-locked CPU tensor of ``num_elem`` elements of ``example_tensor``'s dtype."""
    return aligned_empty(int(num_elem), dtype=example_tensor.dtype, pin=True)


def free_cpu_locked_tensor(tensor):
    """Release a tensor from :func:`new_cpu_locked_tensor`.

    Kept for DeepSpeed API parity: the memory (and its lock) goes back to the OS when the last
    reference to the tensor is dropped, so this only checks the argument.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"free_cpu_locked_tensor expects a tensor, got {type(tensor).__name__}")
    return True
