"""Loading checkpoints written by DeepSpeed 0.19.8 (ZeRO stages 0-3 and the universal layout).

The fixtures under tests/fixtures/deepspeed_ckpt/ were written by DeepSpeed itself on 2 gloo CPU
ranks (make_fixtures.py there, run with a DeepSpeed venv); expected.json holds the losses DeepSpeed
computed for the steps after the save. deepscale loads each checkpoint at the same world size, at
another one and at another ZeRO stage, trains the same steps on the same data and must reproduce
DeepSpeed's losses within 1e-6 (fp32). DeepSpeed itself is not needed to run these tests.
"""
import json
import os
import sys

import pytest
import torch

from dist_harness import run_distributed

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "fixtures",
                        "deepspeed_ckpt")
sys.path.insert(0, FIXTURES)
from fixture_model import (STEPS_AFTER_SAVE, STEPS_BEFORE_SAVE, bf16_fused_adam_config, ds_config,  # noqa: E402
                           make_model, rank_batch)

TOL = 1e-6  # fp32
with open(os.path.join(FIXTURES, "expected.json")) as _handle:
    EXPECTED = json.load(_handle)

# (fixture directory, DeepSpeed stage that wrote it, deepscale stage that loads it)
SAME_STAGE = [("stage0", 0, 0), ("stage1", 1, 1), ("stage2", 2, 2), ("stage3", 3, 3),
              ("stage2_universal", 2, 2), ("stage3_universal", 3, 3)]
OTHER_STAGE = [("stage1", 1, 3), ("stage3", 3, 2), ("stage2_universal", 2, 0)]


def _continue_from(fixture: str, stage: int, world_size: int, config_fn=ds_config):
    import torch.distributed as dist
    import deepscale
    rank = dist.get_rank()
    engine = deepscale.initialize(model=make_model(), config=config_fn(stage, world_size))[0]
    path, client = engine.load_checkpoint(os.path.join(FIXTURES, fixture))
    restored = {"path": os.path.basename(path), "client": client, "global_steps": engine.global_steps,
                "global_samples": engine.global_samples, "lr": engine.get_lr(),
                "last_batch_iteration": engine.lr_scheduler.last_batch_iteration}
    losses = []
    for step in range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE):
        x, y = rank_batch(step, rank, world_size)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.destroy()
    return restored, losses


def _run_all(cases, world_size):
    return [_continue_from(fixture, stage, world_size) for fixture, _, stage in cases]


def _deepspeed_losses(ds_stage: int, rank: int, world_size: int):
    per_rank = [r["losses_after_save"] for r in EXPECTED["stages"][str(ds_stage)]]
    if world_size == len(per_rank):
        return per_rank[rank]
    assert world_size == 1  # one rank sees the whole batch: the mean of the equal-sized halves
    return [sum(values) / len(values) for values in zip(*per_rank)]


def _check(cases, results, rank, world_size):
    for (fixture, ds_stage, stage), (restored, losses) in zip(cases, results):
        saved = EXPECTED["stages"][str(ds_stage)][0]
        assert restored["path"] == EXPECTED["tag"]
        assert restored["client"] == {}
        assert restored["global_steps"] == saved["global_steps_at_save"]
        assert restored["global_samples"] == saved["global_samples_at_save"]
        assert restored["last_batch_iteration"] == STEPS_BEFORE_SAVE - 1
        assert restored["lr"] == pytest.approx(saved["lr_at_save"], abs=1e-12)
        want = _deepspeed_losses(ds_stage, rank, world_size)
        where = f"{fixture} -> deepscale stage {stage}, {world_size} ranks"
        assert losses == pytest.approx(want, abs=TOL, rel=0), where


def test_fixtures_were_written_by_deepspeed_0_19_8():
    assert EXPECTED["deepspeed_version"] == "0.19.8" and EXPECTED["world_size"] == 2
    from deepscale.runtime.checkpoint.deepspeed_format import is_deepspeed_checkpoint
    for fixture, _, _ in SAME_STAGE:
        assert is_deepspeed_checkpoint(os.path.join(FIXTURES, fixture, EXPECTED["tag"])), fixture


def test_same_world_size_continues_like_deepspeed():
    cases = SAME_STAGE + OTHER_STAGE
    for rank, results in enumerate(run_distributed(_run_all, 2, args=(cases, 2))):
        _check(cases, results, rank, 2)


def test_other_world_size_continues_like_deepspeed():
    cases = [("stage0", 0, 0), ("stage1", 1, 1), ("stage2", 2, 2), ("stage3", 3, 3), ("stage3_universal", 3, 1)]
    _check(cases, run_distributed(_run_all, 1, args=(cases, 1))[0], 0, 1)


def _bf16_run(fixture, stage, world_size):
    return _continue_from(fixture, stage, world_size, bf16_fused_adam_config)


@pytest.mark.parametrize("fixture,stage", [("stage2_bf16", 2), ("stage0_bf16", 0), ("stage0_bf16", 3)])
def test_bf16_with_deepspeed_adam_continues_like_deepspeed(fixture, stage):
    """bf16 and DeepSpeed's own Adam (FusedAdam): at ZeRO-2 files named bf16_zero_pp_rank_*, without
    ZeRO DeepSpeed's FP16_Optimizer layout (flat fp32 groups, integer steps). deepscale computes
    the loss in bf16 where DeepSpeed's fp32 buffer promotes it to fp32, so losses agree to bf16
    resolution (2**-8 relative)."""
    expected = EXPECTED["variants"][fixture]
    for rank, (restored, losses) in enumerate(run_distributed(_bf16_run, 2, args=(fixture, stage, 2))):
        assert restored["global_steps"] == 3 and restored["lr"] == pytest.approx(expected[0]["lr_at_save"])
        assert losses == pytest.approx(expected[rank]["losses_after_save"], rel=1e-2, abs=0)


def test_reader_agrees_across_layouts():
    """Every layout holds the same fp32 weights and Adam moments (DeepSpeed is bitwise consistent
    across stages here), so each converted checkpoint must give identical whole tensors."""
    from deepscale.runtime.checkpoint.deepspeed_format import read_deepspeed_checkpoint

    def whole(fixture):
        model_states, shards = read_deepspeed_checkpoint(os.path.join(FIXTURES, fixture, EXPECTED["tag"]))
        out = {}
        for shard in shards():
            for name, entry in shard["fragments"].items():
                for key, value in [("fp32", entry["fp32"]), *entry["state"].items()]:
                    numel = torch.Size(entry["shape"]).numel()
                    target = out.setdefault((name, key), torch.full((numel,), float("nan")))
                    target[entry["start"]:entry["start"] + value.numel()] = value
        return model_states, out

    _, reference = whole("stage0")
    assert {key for _, key in reference} == {"fp32", "exp_avg", "exp_avg_sq"}
    for fixture, _, _ in SAME_STAGE[1:]:
        model_states, got = whole(fixture)
        assert set(got) == set(reference), fixture
        for key, value in reference.items():
            assert torch.equal(got[key], value), (fixture, key)  # no gaps (NaN) and no mix-ups
        for (name, kind), value in got.items():
            if kind == "fp32":
                assert torch.equal(model_states["module"][name].reshape(-1), value), (fixture, name)


def test_deepscale_checkpoints_are_not_taken_for_deepspeed_ones(tmp_path):
    import deepscale
    from deepscale.runtime.checkpoint.deepspeed_format import is_deepspeed_checkpoint
    engine = deepscale.initialize(model=make_model(), config=ds_config(1, 1))[0]
    engine.save_checkpoint(str(tmp_path), tag="mine")
    assert not is_deepspeed_checkpoint(str(tmp_path / "mine"))
    assert engine.load_checkpoint(str(tmp_path))[0].endswith("mine")
    engine.destroy()


@pytest.mark.parametrize("optimizer_state", [
    {"something": "else"},  # not a layout DeepSpeed writes at stage 0
    {"fp32_groups_flat": [torch.zeros(3), torch.zeros(4)],  # two param groups: the split is not recorded
     "optimizer_state_dict": {"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]}}])
def test_unreadable_stage0_optimizer_names_the_way_out(tmp_path, optimizer_state):
    from deepscale.runtime.checkpoint.deepspeed_format import read_deepspeed_checkpoint
    from deepscale.runtime.checkpoint.deepspeed_pickle import load_ds_file
    states = load_ds_file(os.path.join(FIXTURES, "stage0", EXPECTED["tag"], "mp_rank_00_model_states.pt"))
    states["optimizer"] = optimizer_state
    os.makedirs(tmp_path / "t")
    torch.save(states, str(tmp_path / "t" / "mp_rank_00_model_states.pt"))
    _, shards = read_deepspeed_checkpoint(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="load_optimizer_states=False"):
        next(shards())


def test_model_parallel_checkpoints_are_refused(tmp_path):
    import shutil
    from deepscale.runtime.checkpoint.deepspeed_format import read_deepspeed_checkpoint
    tag_dir = tmp_path / "t"
    shutil.copytree(os.path.join(FIXTURES, "stage1", EXPECTED["tag"]), tag_dir)
    shutil.copy(tag_dir / "mp_rank_00_model_states.pt", tag_dir / "mp_rank_01_model_states.pt")
    with pytest.raises(ValueError, match="model parallelism"):
        read_deepspeed_checkpoint(str(tag_dir))


def test_deepscale_zero_to_fp32_names_the_way_for_deepspeed_checkpoints():
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with pytest.raises(ValueError, match="written by DeepSpeed"):
        get_fp32_state_dict_from_zero_checkpoint(os.path.join(FIXTURES, "stage2_bf16"))


def test_stage0_tied_weights_map_optimizer_indices_like_parameters(tmp_path):
    """A tied weight is listed twice in the module state but is one optimizer parameter."""
    from deepscale.runtime.checkpoint.deepspeed_format import read_deepspeed_checkpoint

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.mid = torch.nn.Linear(3, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters())
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    os.makedirs(tmp_path / "t")
    torch.save({"module": model.state_dict(), "optimizer": optimizer.state_dict(), "buffer_names": [],
                "ds_version": "0.19.8", "global_steps": 1, "skipped_steps": 0},
               str(tmp_path / "t" / "mp_rank_00_model_states.pt"))
    _, shards = read_deepspeed_checkpoint(str(tmp_path / "t"))
    shard = next(shards())
    assert shard["param_groups"][0]["names"] == ["embed.weight", "mid.weight", "mid.bias"]
    for name, param in model.named_parameters():
        assert torch.equal(shard["fragments"][name]["state"]["exp_avg"], optimizer.state[param]["exp_avg"].view(-1))


def test_deepspeed_dynamic_loss_scale_converts_to_deepscale():
    """DeepSpeed cannot train fp16 on CPU, so no fixture holds its DynamicLossScaler; this checks
    the conversion on an object with the attributes DeepSpeed 0.19's scaler pickles."""
    import types
    from deepscale.runtime.checkpoint.deepspeed_format import _loss_scaler_state
    from deepscale.runtime.precision.loss_scaler import DynamicLossScaler
    ds_scaler = types.SimpleNamespace(dynamic=True, cur_scale=1024.0, cur_iter=7, last_overflow_iter=3,
                                      cur_hysteresis=1, scale_factor=2.0, scale_window=1000, min_scale=1.0,
                                      delayed_shift=2, consecutive_hysteresis=False)
    scaler = DynamicLossScaler(init_scale=2**16, delayed_shift=2)
    scaler.load_state_dict(_loss_scaler_state(ds_scaler))
    assert (scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis) == (1024.0, 7, 3, 1)
    assert _loss_scaler_state(types.SimpleNamespace(dynamic=False, cur_scale=1.0)) is None  # static: config decides
