"""Swap files: block-padded round trips, debug verification, clean removal, a full disk."""
import errno
import os

import pytest
import torch

from deepscale.ops.aio import AioConfig
from deepscale.runtime.offload.swap_file import SwapFiles, SwapSpaceError, swap_directory

BLOCK = 8192


def _files(root, debug=False, rank=0):
    return SwapFiles(str(root), "optimizer", rank, AioConfig(block_size=BLOCK), debug=debug)


def test_round_trip_pads_to_the_block_size(tmp_path):
    files = _files(tmp_path)
    n = 1000  # 4000 bytes: one padded block
    padded = files.padded_numel(n, torch.float32)
    assert padded == BLOCK // 4
    src = torch.zeros(padded)
    src[:n] = torch.arange(n, dtype=torch.float32)
    files.write("a", src, n)
    files.wait()
    assert os.path.getsize(files.path("a")) == BLOCK
    dst = torch.full((padded,), -1.0)
    files.read("a", dst, n)
    files.wait()
    assert torch.equal(dst[:n], src[:n])
    assert files.bytes_written == files.bytes_read == BLOCK
    with pytest.raises(ValueError, match="shorter than"):
        files.write("b", torch.zeros(n), n)
    with pytest.raises(ValueError, match="logical bytes"):
        files.read("a", dst, n - 1)
    files.close()


def test_debug_mode_catches_a_short_or_changed_file(tmp_path):
    files = _files(tmp_path, debug=True)
    n = files.padded_numel(10, torch.float32)
    buf = torch.ones(n)
    files.write("a", buf, 10)
    files.wait()
    with open(files.path("a"), "r+b") as f:  # a stale byte on disk
        f.write(b"\x07")
    files.read("a", buf, 10)
    files.wait()
    with pytest.raises(OSError, match="CRC mismatch"):
        files.verify("a", buf)
    os.truncate(files.path("a"), 100)  # a short file
    with pytest.raises(OSError, match="short or stale"):
        files.read("a", buf, 10)
    files.close()


def test_directory_removed_on_close_and_on_next_start(tmp_path):
    stale = swap_directory(str(tmp_path), "optimizer", 3)
    os.makedirs(stale)
    open(os.path.join(stale, "sg0.master.swp"), "wb").close()  # left by a crashed run
    files = _files(tmp_path, rank=3)
    assert os.listdir(stale) == []
    buf = torch.zeros(files.padded_numel(4, torch.float32))
    files.write("x", buf, 4)
    files.wait()
    assert os.listdir(stale) == ["x.swp"]
    files.close()
    assert not os.path.exists(stale)


def test_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    files = _files(tmp_path)

    def full(*_):
        raise OSError(errno.ENOSPC, "async I/O write failed: No space left on device", files.path("a"))

    monkeypatch.setattr(files.writes, "wait", full)
    with pytest.raises(SwapSpaceError, match=r"no space left for swap files in .* GiB free\): give offload "
                                             r"nvme_path a larger disk"):
        files.wait()
    files.close = lambda: None
