"""Checkpoints with optimizer states on NVMe or CPU stay portable across offload, stage and world size.

The global batch is 8 samples at every world size, so a resumed run sees the batches of the
uninterrupted one (see test_zero_checkpoint.py).
"""
import torch

from dist_harness import run_distributed
from _offload_helpers import offload_kwargs
from _zero_test_helpers import build_engine, module_params, train

GLOBAL_BATCH = 8
SCHED = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}}}


def _engine(stage, world, offload, nvme_root, seed=1234):
    return build_engine(stage, world, micro_bs=GLOBAL_BATCH // world, extra_cfg=dict(SCHED), seed=seed,
                        two_groups=True, sub_group_size=150, **offload_kwargs(offload, nvme_root))


def _save_run(stage, world, offload, nvme_root, ckpt_dir, total, save_at):
    engine = _engine(stage, world, offload, nvme_root)
    losses = train(engine, world, range(save_at), micro_bs=GLOBAL_BATCH // world)
    engine.save_checkpoint(ckpt_dir)
    saved = module_params(engine)
    losses += train(engine, world, range(save_at, total), micro_bs=GLOBAL_BATCH // world)
    params = module_params(engine)
    engine.destroy()
    return losses, params, saved


def _resume_run(stage, world, offload, nvme_root, ckpt_dir, total, save_at):
    engine = _engine(stage, world, offload, nvme_root, seed=99)  # other weights: the load must replace them
    engine.load_checkpoint(ckpt_dir)
    losses = train(engine, world, range(save_at, total), micro_bs=GLOBAL_BATCH // world)
    params = module_params(engine)
    engine.destroy()
    return losses, params


def _check(uninterrupted, final, resumed, label):
    for losses, params in resumed:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(uninterrupted), rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{label}: {m}")
        for name, value in final.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)


def test_nvme_stage3_two_ranks_resumes_without_offload_one_rank_stage1_and_back(tmp_path):
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    total, save_at = 4, 2
    ckpt, nvme = str(tmp_path / "ckpt"), str(tmp_path / "nvme")
    full, final, saved = run_distributed(_save_run, 2, args=(3, 2, "nvme", nvme, ckpt, total, save_at))[0]
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt)  # zero_to_fp32 on states saved from NVMe
    for name, value in saved.items():
        torch.testing.assert_close(state[name].float(), value, rtol=0, atol=0)
    resumed = run_distributed(_resume_run, 1, args=(1, 1, "none", nvme, ckpt, total, save_at))
    _check(full[save_at:], final, resumed, "nvme stage 3 x2 -> none stage 1 x1")
    ckpt2 = str(tmp_path / "ckpt2")
    full, final, _ = run_distributed(_save_run, 1, args=(2, 1, "none", nvme, ckpt2, total, save_at))[0]
    resumed = run_distributed(_resume_run, 2, args=(3, 2, "nvme", nvme, ckpt2, total, save_at))
    _check(full[save_at:], final, resumed, "none stage 2 x1 -> nvme stage 3 x2")


def test_cpu_offload_stage2_resumes_as_nvme_stage1(tmp_path):
    total, save_at = 4, 2
    ckpt, nvme = str(tmp_path / "ckpt"), str(tmp_path / "nvme")
    full, final, _ = run_distributed(_save_run, 2, args=(2, 2, "cpu", nvme, ckpt, total, save_at))[0]
    resumed = run_distributed(_resume_run, 2, args=(1, 2, "nvme", nvme, ckpt, total, save_at))
    _check(full[save_at:], final, resumed, "cpu stage 2 -> nvme stage 1")
