"""Checkpoints that survive failing ranks, full disks, crashed saves and damaged files.

Each test targets one way a save or a resume goes wrong in practice: a rank raising while
it writes (every rank must fail fast, not wait at a barrier), a full disk, the leftovers of a
crashed save, a truncated file, ``latest`` moving before its directory is published, and an
fp16 loss scale that must survive the resume.
"""
import errno
import os
import shutil
import subprocess
import time

import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import base_config, make_model, rank_micro_batch

from deepscale.runtime.checkpoint import atomic
from deepscale.runtime.checkpoint.engine_checkpoint import CheckpointSaveError
from deepscale.utils.checkpoint_files import CorruptCheckpointError

MICRO_BS = 2


def _engine(world_size, seed=1234, **extra):
    import deepscale
    return deepscale.initialize(model=make_model(seed=seed), config=base_config(MICRO_BS, 1, world_size, **extra))[0]


def _train(engine, world_size, steps, overflow_steps=()):
    """Train on ``steps``; returns (losses, loss scales after each step)."""
    import torch.distributed as dist
    losses, scales = [], []
    for step in steps:
        x, y = rank_micro_batch(step, 0, dist.get_rank(), MICRO_BS, 1, world_size)
        if step in overflow_steps:
            x[0, 0] = float("inf")  # the gradients overflow: the step is skipped, the scale moves
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        scales.append(engine.loss_scale)
    return losses, scales


def _params(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _check_previous_loads(world_size, ckpt, want_tag, want_params):
    engine = _engine(world_size, seed=99)
    path, _ = engine.load_checkpoint(ckpt)
    assert path == os.path.join(ckpt, want_tag), path
    for name, value in _params(engine).items():
        assert torch.equal(value, want_params[name]), name
    engine.destroy()


# --- a rank that fails while saving ------------------------------------------------------

def _failing_rank_run(world_size, ckpt, failing_rank):
    import torch.distributed as dist
    from deepscale.runtime.checkpoint import engine_checkpoint
    engine = _engine(world_size)
    _train(engine, world_size, range(2))
    engine.save_checkpoint(ckpt, tag="good")
    good = _params(engine)
    _train(engine, world_size, range(2, 3))
    real_save = engine_checkpoint.save_file
    if dist.get_rank() == failing_rank:
        def failing_save(obj, path):
            raise RuntimeError(f"injected failure writing {os.path.basename(path)}")
        engine_checkpoint.save_file = failing_save
    start = time.monotonic()
    try:
        engine.save_checkpoint(ckpt, tag="bad")
        outcome = None
    except CheckpointSaveError as exc:
        outcome = (str(exc), exc.failures)
    finally:
        engine_checkpoint.save_file = real_save
    elapsed = time.monotonic() - start
    engine.destroy()
    dist.barrier()
    _check_previous_loads(world_size, ckpt, "good", good)
    return outcome, elapsed


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_rank_failing_inside_save_fails_the_save_on_every_rank(tmp_path, failing_rank):
    ckpt = str(tmp_path)
    # The harness gives up after 60 s: a rank stuck at a barrier fails the test.
    results = run_distributed(_failing_rank_run, 2, args=(2, ckpt, failing_rank), timeout=60)
    for outcome, elapsed in results:
        assert outcome is not None, "the save succeeded on a rank although another one failed"
        message, failures = outcome
        assert list(failures) == [failing_rank]
        assert f"rank(s) {failing_rank}" in message and "injected failure writing" in message
        assert "bad" in message and elapsed < 30
    assert atomic.read_latest_tag(ckpt) == "good"
    assert sorted(os.listdir(ckpt)) == ["good", "latest"]  # staging directory removed


# --- a full disk --------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs, or a plain directory where mounting is not permitted (then the test
    simulates ENOSPC inside torch.save)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    yield str(mount_point), proc.returncode == 0
    if proc.returncode == 0:
        # Lazy: the ranks (pooled processes) may still map a loaded shard from it.
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path):
    """Write ``path`` until its disk has no space left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096) > 0:
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert shutil.disk_usage(os.path.dirname(path)).free < 4096


def _full_disk_run(world_size, ckpt, really_full):
    import torch.distributed as dist
    from deepscale.utils import checkpoint_files
    engine = _engine(world_size)
    _train(engine, world_size, range(2))
    engine.save_checkpoint(ckpt, tag="good")
    good = _params(engine)
    filler = os.path.join(os.path.dirname(ckpt), "filler")
    real_save = checkpoint_files.torch.save
    if really_full and dist.get_rank() == 0:
        _fill(filler)
    elif not really_full:
        def no_space(obj, f, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        checkpoint_files.torch.save = no_space
    dist.barrier()
    try:
        engine.save_checkpoint(ckpt, tag="bad")
        outcome = None
    except CheckpointSaveError as exc:
        outcome = (str(exc), exc.failures)
    finally:
        checkpoint_files.torch.save = real_save
    dist.barrier()
    if dist.get_rank() == 0 and os.path.exists(filler):
        os.remove(filler)
    dist.barrier()
    engine.destroy()
    _check_previous_loads(world_size, ckpt, "good", good)
    return outcome


def test_full_disk_fails_on_every_rank_and_keeps_the_previous_checkpoint(small_disk):
    disk, really_full = small_disk
    ckpt = os.path.join(disk, "ckpt")
    for outcome in run_distributed(_full_disk_run, 2, args=(2, ckpt, really_full), timeout=60):
        assert outcome is not None, "a save into a full disk succeeded"
        message, failures = outcome
        assert failures, message
        for text in failures.values():
            assert "is full" in text and "bytes free" in text and ckpt in text, text
    assert atomic.read_latest_tag(ckpt) == "good"
    assert sorted(os.listdir(ckpt)) == ["good", "latest"]


# --- leftovers of a crashed save ---------------------------------------------------------

def _fake_leftovers(ckpt):
    os.makedirs(os.path.join(ckpt, ".tmp-other_tag-0123456789ab"))
    with open(os.path.join(ckpt, ".tmp-other_tag-0123456789ab", "half.pt"), "wb") as handle:
        handle.write(b"partial")
    with open(os.path.join(ckpt, ".tmp-latest-deadbeef"), "w") as handle:
        handle.write("other_tag")


def test_staging_left_by_a_crashed_save_is_removed_on_next_load_and_save(tmp_path):
    ckpt = str(tmp_path)
    engine = _engine(1)
    _train(engine, 1, range(1))
    engine.save_checkpoint(ckpt, tag="first")
    _fake_leftovers(ckpt)
    assert engine.load_checkpoint(ckpt)[0] == os.path.join(ckpt, "first")
    assert sorted(os.listdir(ckpt)) == ["first", "latest"]
    _fake_leftovers(ckpt)
    # An overwrite of "first" that crashed between its two renames left it set aside.
    os.rename(os.path.join(ckpt, "first"), os.path.join(ckpt, ".old-first-abcdef12"))
    engine.save_checkpoint(ckpt, tag="second")
    assert sorted(os.listdir(ckpt)) == ["first", "latest", "second"]
    assert engine.load_checkpoint(ckpt, tag="first")[0] == os.path.join(ckpt, "first")
    engine.destroy()


# --- damaged files ------------------------------------------------------------------------

@pytest.mark.parametrize("victim,damage", [
    ("mp_rank_00_model_states.pt", "truncate"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate"),
    ("rng_states_rank0.pt", "garble"),
])
def test_damaged_checkpoint_file_error_names_the_file(tmp_path, victim, damage):
    ckpt = str(tmp_path)
    engine = _engine(1)
    _train(engine, 1, range(1))
    engine.save_checkpoint(ckpt, tag="t")
    path = os.path.join(ckpt, "t", victim)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2] if damage == "truncate" else bytes(b ^ 0x5A for b in data))
    with pytest.raises(RuntimeError) as info:
        engine.load_checkpoint(ckpt)
    assert path in str(info.value) and "truncated or corrupt" in str(info.value)
    if victim != "zero_pp_rank_0_mp_rank_00_optim_states.pt":  # read by the standalone zero_to_fp32
        assert isinstance(info.value, CorruptCheckpointError) and info.value.path == path
    engine.destroy()


# --- `latest` moves only after its directory is published --------------------------------

def _complete(tag_dir):
    names = set(os.listdir(tag_dir)) if os.path.isdir(tag_dir) else set()
    return {"mp_rank_00_model_states.pt", "rng_states_rank0.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= names


def test_latest_never_names_an_unpublished_directory(tmp_path, monkeypatch):
    ckpt = str(tmp_path)
    engine = _engine(1)
    _train(engine, 1, range(1))
    engine.save_checkpoint(ckpt, tag="first")
    first = _params(engine)
    _train(engine, 1, range(1, 2))
    real_replace, real_rename = os.replace, os.rename
    seen = []

    def checking_replace(src, dst):
        real_replace(src, dst)
        if os.path.basename(dst) == "latest":  # the moment `latest` moves, its tag must be complete
            tag = atomic.read_latest_tag(ckpt)
            seen.append((tag, _complete(os.path.join(ckpt, tag))))

    monkeypatch.setattr(os, "replace", checking_replace)
    engine.save_checkpoint(ckpt, tag="second")
    assert seen == [("second", True)]

    def failing_publish(src, dst):  # the staging directory cannot be renamed to its tag
        if os.path.basename(dst) in ("third", "first") and ".tmp-" in src:
            raise OSError(errno.EIO, "injected failure publishing", dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_publish)
    with pytest.raises(CheckpointSaveError, match="publishing the checkpoint"):
        engine.save_checkpoint(ckpt, tag="third")
    with pytest.raises(CheckpointSaveError, match="publishing the checkpoint"):
        engine.save_checkpoint(ckpt, tag="first")  # an overwrite: the old "first" must come back
    monkeypatch.undo()
    assert atomic.read_latest_tag(ckpt) == "second"
    assert seen == [("second", True)]
    assert sorted(os.listdir(ckpt)) == ["first", "latest", "second"]
    engine.destroy()
    resumed = _engine(1, seed=7)
    assert resumed.load_checkpoint(ckpt)[0] == os.path.join(ckpt, "second")
    assert resumed.load_checkpoint(ckpt, tag="first")[0] == os.path.join(ckpt, "first")
    assert all(torch.equal(v, first[n]) for n, v in _params(resumed).items())
    resumed.destroy()


# --- fp16: the loss scaler is part of the resumed state ----------------------------------

FP16 = {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 3, "hysteresis": 2, "min_loss_scale": 1}
OVERFLOW_STEPS = (1, 2, 4, 5, 8, 9, 10)  # around the save at step 6 and after it
SAVE_AT, TOTAL = 6, 14


def _fp16_resume_run(world_size, ckpt):
    import torch.distributed as dist
    full = _engine(world_size, fp16=dict(FP16))
    want_losses, want_scales = _train(full, world_size, range(TOTAL), OVERFLOW_STEPS)
    full.destroy()
    first = _engine(world_size, fp16=dict(FP16))
    _, scales = _train(first, world_size, range(SAVE_AT), OVERFLOW_STEPS)
    first.save_checkpoint(ckpt)
    scale_at_save = first.loss_scale
    first.destroy()
    dist.barrier()
    resumed = _engine(world_size, seed=5, fp16=dict(FP16))
    resumed.load_checkpoint(ckpt)
    scale_after_load = resumed.loss_scale
    losses, scales = _train(resumed, world_size, range(SAVE_AT, TOTAL), OVERFLOW_STEPS)
    return want_losses[SAVE_AT:], want_scales[SAVE_AT:], losses, scales, scale_at_save, scale_after_load


def test_fp16_resume_restores_the_loss_scaler_exactly(tmp_path):
    for want_losses, want_scales, losses, scales, at_save, after_load in run_distributed(
            _fp16_resume_run, 2, args=(2, str(tmp_path))):
        assert at_save != 2.0**FP16["initial_scale_power"], "the scale must have moved before the save"
        assert after_load == at_save
        assert scales == want_scales  # hysteresis and window counters restored too
        assert losses == want_losses  # bit-identical continuation
