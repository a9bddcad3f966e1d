"""ReleasableBuffer: release gives the memory back, the tensor object (and views of it) stay valid."""
import psutil
import pytest
import torch

from deepscale.runtime.zero.stage3 import buffers
from deepscale.runtime.zero.stage3.buffers import ReleasableBuffer

MIB = 1 << 20


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_release_returns_memory_and_views_stay_usable(dtype):
    numel = 64 * MIB // torch.empty(0, dtype=dtype).element_size()
    buf = ReleasableBuffer(numel, dtype, "cpu")
    view = buf.tensor[10:20]
    buf.acquire().fill_(3)
    before = _rss_mib()
    buf.release()
    assert before - _rss_mib() > 48, "releasing 64 MiB should lower RSS"
    assert not buf.resident
    full = buf.acquire()
    assert full is buf.tensor and full.numel() == numel and full.dtype == dtype
    full.fill_(5)
    assert torch.all(view == 5)  # a view taken before the release sees the refilled values


def test_storage_resize_path(monkeypatch):
    # Devices without mmap-backed buffers (CUDA, or no madvise) resize the storage instead.
    monkeypatch.setattr(buffers, "_can_map", lambda device: False)
    buf = ReleasableBuffer(1000, torch.float32, "cpu")
    buf.acquire().fill_(1)
    buf.release()
    assert buf.tensor.untyped_storage().nbytes() == 0
    assert buf.acquire().untyped_storage().nbytes() == 4000
    buf.tensor.fill_(2)
    assert buf.tensor.sum().item() == 2000
