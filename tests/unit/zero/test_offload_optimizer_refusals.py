"""Impossible offload configs and a full disk stop every rank with the figures, never a hang."""
import errno

import pytest

from dist_harness import run_distributed
from _offload_helpers import offload_kwargs
from _zero_test_helpers import build_engine, train


def _refused(nvme_root, small_rank):
    import torch.distributed as dist
    from deepscale.runtime.offload import planner
    real = planner.free_disk_bytes
    if dist.get_rank() == small_rank:  # this rank's nvme_path is a tiny disk (simulated free space)
        planner.free_disk_bytes = lambda path: 4096.0
    try:
        build_engine(3, 2, **offload_kwargs("nvme", nvme_root))
    except ValueError as err:
        return str(err)
    finally:
        planner.free_disk_bytes = real  # the worker process serves later tests
    return None


def test_planner_refuses_on_every_rank_before_training(tmp_path):
    messages = run_distributed(_refused, 2, args=(str(tmp_path), 1))
    assert "another rank's node" in messages[0] and "per rank: device" in messages[0]
    assert "MiB of swap files needed per node (2 rank(s) x" in messages[1]
    assert "4.00 KiB is free under offload_optimizer.nvme_path" in messages[1]
    assert "point nvme_path at a larger disk" in messages[1]


def _disk_full_at_step(nvme_root, full_rank):
    import torch.distributed as dist
    from deepscale.runtime.offload.swap_file import SwapFiles, SwapSpaceError
    engine = build_engine(2, 2, **offload_kwargs("nvme", nvme_root))
    train(engine, 2, range(1))
    real = SwapFiles.wait_writes
    if dist.get_rank() == full_rank:
        def full(self):
            raise SwapSpaceError(errno.ENOSPC, "no space left for swap files in (test)")
        SwapFiles.wait_writes = full
    try:
        train(engine, 2, range(1, 2))
    except OSError as err:
        return type(err).__name__, str(err)
    finally:
        SwapFiles.wait_writes = real
        engine.destroy()
    return None


def test_a_full_disk_on_one_rank_stops_every_rank(tmp_path):
    (name0, msg0), (name1, msg1) = run_distributed(_disk_full_at_step, 2, args=(str(tmp_path), 1))
    assert name1 == "SwapSpaceError" and "no space left" in msg1
    assert name0 == "OSError" and "failed on another rank" in msg0
