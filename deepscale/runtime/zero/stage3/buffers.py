"""Flat buffers whose memory is given back to the system while they are not needed.

Note: why not plain ``torch.empty``. ZeRO-3 gathers every group twice per step and drops it
after use. On CUDA the caching allocator reuses those blocks. On CPU every buffer comes from
glibc malloc, whose heap keeps freed chunks of varying sizes resident and cannot reuse them
for differently sized requests: measured on the 23M GPT at 2 ranks, the heap held 600 MiB of
free chunks after three steps (in use: 250 MiB), which put stage 3's peak RSS above DDP's. So
on CPU (Linux) each buffer is its own anonymous private mapping, advised to use transparent
huge pages: :meth:`ReleasableBuffer.release` drops its pages (``MADV_DONTNEED``; the next write
faults zero pages back in, about 0.04 ms per MiB with huge pages), the tensor and every view of
it stay valid. On other devices, and where ``mmap.madvise`` is missing, release resizes the
tensor's storage to zero bytes and :meth:`ReleasableBuffer.acquire` restores it. Either way the
tensor object stays the same, which is what lets autograd's saved views of gathered weights
see the values again once the group is re-gathered (see ``param_group.py``).
"""
import mmap

import torch

_HUGE_PAGE = 2 * 1024 * 1024


def _can_map(device: torch.device) -> bool:
    return (device.type == "cpu" and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MADV_DONTNEED")
            and hasattr(mmap.mmap, "madvise"))


class ReleasableBuffer:
    """A flat tensor of ``numel`` elements whose memory :meth:`release` returns to the system.

    Args:
        numel: elements.
        dtype: element type.
        device: where it lives.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device):
        self.numel, self.dtype, self.device = int(numel), dtype, torch.device(device)
        self._map = None
        nbytes = self.numel * torch.empty(0, dtype=dtype).element_size()
        if _can_map(self.device) and nbytes > 0:
            self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if nbytes >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
                self._map.madvise(mmap.MADV_HUGEPAGE)
            self.tensor = torch.frombuffer(self._map, dtype=dtype, count=self.numel)
        else:
            self.tensor = torch.empty(self.numel, dtype=dtype, device=self.device)
        self._nbytes = nbytes
        self.resident = True

    def acquire(self) -> torch.Tensor:
        """Make the memory usable again (contents undefined) and return the tensor."""
        if not self.resident:
            if self._map is None:
                self.tensor.untyped_storage().resize_(self._nbytes)
            self.resident = True
        return self.tensor

    def release(self) -> None:
        """Give the memory back; the tensor keeps its shape and :meth:`acquire` restores it."""
        if not self.resident:
            return
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)
        else:
            self.tensor.untyped_storage().resize_(0)
        self.resident = False
