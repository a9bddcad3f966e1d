"""Checkpoints load at any topology and ZeRO stage, and consolidate to one fp32 state dict.

The global batch is 8 samples at every world size (micro-batch 8 // world), so a run resumed
at another world size sees exactly the batches of the uninterrupted run.
"""
import os

import pytest
import torch

from dist_harness import run_distributed
from _zero_test_helpers import build_engine, module_params, train

GLOBAL_BATCH = 8
SCHED = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}}}


def _engine(stage, world, dtype=None, seed=1234, **kwargs):
    extra = dict(SCHED)
    if dtype:
        extra[dtype] = {"enabled": True}
    return build_engine(stage, world, micro_bs=GLOBAL_BATCH // world, extra_cfg=extra, seed=seed, two_groups=True,
                        **kwargs)


def _save_run(stage, world, ckpt_dir, total, save_at):
    engine = _engine(stage, world)
    losses = train(engine, world, range(save_at), micro_bs=GLOBAL_BATCH // world)
    engine.save_checkpoint(ckpt_dir)
    losses += train(engine, world, range(save_at, total), micro_bs=GLOBAL_BATCH // world)
    return losses, module_params(engine)


def _resume_run(stage, world, ckpt_dir, total, save_at):
    engine = _engine(stage, world, seed=99)  # different initial weights: the load must replace them
    path, _ = engine.load_checkpoint(ckpt_dir)
    assert engine.global_steps == save_at
    losses = train(engine, world, range(save_at, total), micro_bs=GLOBAL_BATCH // world)
    return path, losses, module_params(engine), engine.get_lr()


def test_two_ranks_stage2_resumes_at_four_ranks_stage1_and_one_rank_stage0(tmp_path):
    total, save_at = 6, 3
    uninterrupted, final = run_distributed(_save_run, 2, args=(2, 2, str(tmp_path), total, save_at))[0]
    for stage, world in ((1, 4), (0, 1), (2, 2)):
        for path, losses, params, lr in run_distributed(_resume_run, world,
                                                        args=(stage, world, str(tmp_path), total, save_at)):
            assert os.path.basename(path) == f"global_step{save_at}"
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(uninterrupted[save_at:]), rtol=1e-6,
                                       atol=1e-7, msg=lambda m: f"stage {stage} x {world} ranks: {m}")
            for name, value in final.items():
                torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)
            assert lr == [pytest.approx(v) for v in (1e-2, 1e-2)]


def test_stage0_checkpoint_resumes_at_two_ranks_stage2(tmp_path):
    total, save_at = 5, 2
    uninterrupted, _ = run_distributed(_save_run, 1, args=(0, 1, str(tmp_path), total, save_at))[0]
    for _, losses, _, _ in run_distributed(_resume_run, 2, args=(2, 2, str(tmp_path), total, save_at)):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(uninterrupted[save_at:]), rtol=1e-6, atol=1e-7)


def _save_bf16(world, ckpt_dir):
    from deepscale.utils import safe_get_full_fp32_param
    engine = _engine(2, world, dtype="bf16", model_kwargs={"frozen": True})
    train(engine, world, range(3), micro_bs=GLOBAL_BATCH // world)
    engine.save_checkpoint(ckpt_dir, tag="bf16")
    return {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters() if p.requires_grad}


def test_zero_to_fp32_consolidates_masters_offline_and_from_python(tmp_path):
    from deepscale.utils.zero_to_fp32 import (convert_zero_checkpoint_to_fp32_state_dict,
                                              get_fp32_state_dict_from_zero_checkpoint,
                                              load_state_dict_from_zero_checkpoint, main)
    from engine_test_models import make_model
    masters = run_distributed(_save_bf16, 2, args=(2, str(tmp_path)))[0]
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    reference = make_model(frozen=True)
    assert list(state) == list(reference.state_dict())
    for name, value in masters.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], value), name  # the fp32 masters, not the bf16 weights
    assert torch.equal(state["layers.0.weight"], reference.layers[0].weight.detach().bfloat16().float())  # frozen
    assert "layers.0.weight" not in get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="bf16",
                                                                             exclude_frozen_parameters=True)
    loaded = load_state_dict_from_zero_checkpoint(make_model(seed=5, frozen=True), str(tmp_path))
    assert torch.equal(loaded.layers[1].weight.detach(), masters["layers.1.weight"])
    pt_file = convert_zero_checkpoint_to_fp32_state_dict(str(tmp_path), str(tmp_path / "out" / "model.pt"))
    assert all(torch.equal(v, state[k]) for k, v in torch.load(pt_file).items())
    assert main([str(tmp_path / "bf16"), str(tmp_path / "cli.pt")]) == 0
    assert all(torch.equal(v, state[k]) for k, v in torch.load(str(tmp_path / "cli.pt")).items())
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x.pt")]) == 2


def test_zero_to_fp32_writes_safetensors(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors output needs the safetensors package")
    from safetensors.torch import load_file
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, main
    run_distributed(_save_bf16, 2, args=(2, str(tmp_path)))
    assert main([str(tmp_path / "bf16"), str(tmp_path / "model.safetensors")]) == 0
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert set(loaded) == set(state) and all(torch.equal(v, state[k]) for k, v in loaded.items())


def test_missing_shard_is_a_clear_error(tmp_path):
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    run_distributed(_save_run, 2, args=(1, 2, str(tmp_path), 1, 1))
    os.remove(tmp_path / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(FileNotFoundError, match="saved by 2 ranks"):
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
