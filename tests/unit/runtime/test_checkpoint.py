"""Checkpoints: exact resume, crash safety of the write, loading at another world size."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import base_config, make_model, rank_micro_batch, train_steps

MICRO_BS = 2
SCHED = {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}}


def _engine(world_size, seed=1234, dtype=None):
    import deepscale
    extra = {"scheduler": SCHED}
    if dtype:
        extra[dtype] = {"enabled": True}
    model = make_model(seed=seed, dropout=0.1)
    return deepscale.initialize(model=model, config=base_config(MICRO_BS, 1, world_size, **extra))[0]


def _train(engine, world_size, steps):
    return train_steps(engine, steps, MICRO_BS, world_size)


def _resume_run(world_size, ckpt_dir, dtype):
    full = _engine(world_size, dtype=dtype)
    uninterrupted = _train(full, world_size, range(10))
    full.destroy()
    first = _engine(world_size, dtype=dtype)
    _train(first, world_size, range(5))
    first.save_checkpoint(ckpt_dir, client_state={"epoch": 7})
    torch.rand(100)  # disturb the RNG: the load must restore it
    first.destroy()
    resumed = _engine(world_size, seed=999, dtype=dtype)
    path, client = resumed.load_checkpoint(ckpt_dir)
    after = _train(resumed, world_size, range(5, 10))
    return uninterrupted[5:], after, path, client, resumed.global_steps, resumed.get_lr()


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_resume_reproduces_uninterrupted_run(tmp_path, dtype):
    for want, got, path, client, steps, lr in run_distributed(_resume_run, 2, args=(2, str(tmp_path), dtype)):
        assert got == want  # bit-identical
        assert path == os.path.join(str(tmp_path), "global_step5")
        assert client == {"epoch": 7}
        assert steps == 10
        assert lr == [pytest.approx(1e-2)]


def _save_at(world_size, ckpt_dir):
    engine = _engine(world_size)
    _train(engine, world_size, range(3))
    engine.save_checkpoint(ckpt_dir, tag="shared")
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _load_at(world_size, ckpt_dir):
    engine = _engine(world_size, seed=5)
    path, _ = engine.load_checkpoint(ckpt_dir)
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    more = _train(engine, world_size, range(3, 5))
    return path, params, more, engine.global_steps


def test_checkpoint_from_two_ranks_loads_at_one_and_four(tmp_path):
    saved = run_distributed(_save_at, 2, args=(2, str(tmp_path)))[0]
    for world_size in (1, 4):
        for path, params, more, steps in run_distributed(_load_at, world_size, args=(world_size, str(tmp_path))):
            assert path.endswith("shared") and steps == 3 + 2  # 3 loaded, 2 more trained
            for name, value in saved.items():
                assert torch.equal(params[name], value), name
            assert all(torch.isfinite(torch.tensor(more)))


def test_missing_checkpoint_returns_none(tmp_path):
    engine = _engine(1)
    assert engine.load_checkpoint(str(tmp_path / "nothing")) == (None, None)
    assert engine.load_checkpoint(str(tmp_path), tag="global_step42") == (None, None)
    engine.destroy()


_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {unit_dir!r})
    import deepscale
    from engine_test_models import base_config, make_model, rank_micro_batch
    engine = deepscale.initialize(model=make_model(), config=base_config(2, 1, 1))[0]
    def step(i):
        x, y = rank_micro_batch(i, 0, 0, 2, 1, 1)
        engine.backward(engine(x, y)); engine.step()
    step(0)
    engine.save_checkpoint({ckpt!r}, tag={first_tag!r})
    step(1)
    mode = {mode!r}
    real_save, real_rename = torch.save, os.rename
    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as handle:
            handle.write(b"partial")  # half-written file, then the process is killed
        os.kill(os.getpid(), signal.SIGKILL)
    def dying_rename(src, dst):
        real_rename(src, dst)
        if ".old-" in dst:
            os.kill(os.getpid(), signal.SIGKILL)  # old tag moved aside, new one not yet in place
    if mode == "write":
        torch.save = dying_save
    else:
        os.rename = dying_rename
    engine.save_checkpoint({ckpt!r}, tag={second_tag!r})
""")


@pytest.mark.parametrize("mode,second_tag", [("write", "second"), ("write", "first"), ("rename", "first")])
def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, mode, second_tag):
    ckpt = str(tmp_path / "ckpt")
    unit_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _CRASH_SCRIPT.format(unit_dir=unit_dir, ckpt=ckpt, first_tag="first", second_tag=second_tag, mode=mode)
    env = {**os.environ, "DEEPSCALE_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    engine = _engine(1, seed=77)
    first_weights = torch.load(os.path.join(ckpt, "first", "mp_rank_00_model_states.pt"), weights_only=False) \
        if os.path.isdir(os.path.join(ckpt, "first")) else None
    path, _ = engine.load_checkpoint(ckpt)
    assert path is not None and os.path.basename(path).startswith(("first", ".old-first")), path
    assert engine.global_steps == 1
    if first_weights is not None:
        for name, param in engine.module.named_parameters():
            assert torch.equal(param, first_weights["module"][name])
    engine.destroy()


def test_resume_with_other_accumulation_steps_starts_on_a_boundary(tmp_path):
    import deepscale
    engine = _engine(1)
    _train(engine, 1, range(3))
    engine.save_checkpoint(str(tmp_path))
    engine.destroy()
    model = make_model(seed=5)
    resumed = deepscale.initialize(model=model, config=base_config(MICRO_BS, 2, 1))[0]
    resumed.load_checkpoint(str(tmp_path), load_lr_scheduler_states=False)
    assert resumed.global_steps == 3 and resumed.micro_steps == 6
    assert not resumed.is_gradient_accumulation_boundary()
    x, y = rank_micro_batch(0, 0, 0, MICRO_BS, 1, 1)
    for _ in range(2):
        resumed.backward(resumed(x, y))
        resumed.step()
    assert resumed.global_steps == 4
    resumed.destroy()
