"""ZeRO-3 parameter offload (``offload_param`` cpu/nvme) matches the same run without offload.

2 ranks on gloo, 10 steps with gradient accumulation and clipping, the tiny GPT with small
stage-3 thresholds (many groups, persistent parameters, prefetch, a module called twice, tied
embeddings). Offload moves shards, it never changes a value: fp32 losses and final weights agree
to 1e-6 relative, bf16 ones too (the same bf16 shards are gathered).
"""
import os

import pytest
import torch

from dist_harness import run_distributed
from _zero3_helpers import STAGE3_SMALL, build_gpt_engine, full_params, train_gpt

NUM_STEPS = 10
GAS, CLIP = 2, 0.5


def offload_section(device, nvme_path, **extra):
    section = {"device": device}
    if device == "nvme":
        section.update(nvme_path=nvme_path, max_in_cpu=0, buffer_count=2, buffer_size=2000)
    section.update(extra)
    return section


def _train(world, offload, extra_cfg, model_kwargs=None):
    zero = dict(STAGE3_SMALL)
    if offload is not None:
        zero["offload_param"] = offload
    engine = build_gpt_engine(3, world, gas=GAS, clip=CLIP, extra_cfg=extra_cfg, model_kwargs=model_kwargs, **zero)
    losses = train_gpt(engine, world, range(NUM_STEPS), gas=GAS)
    params = full_params(engine)
    opt = engine._train_opt
    stats = opt.param_offload.stats() if opt.param_offload is not None else None
    shard_numel_resident = None
    if opt.param_offload is not None:
        # between steps no offloaded shard is held in the module's storage
        shard_numel_resident = sum(g.shard_numel for i, g in opt.param_offload.groups.items()
                                   if opt.param_offload._buffers[i].resident)
    engine.destroy()
    return losses, params, stats, shard_numel_resident


def _parity(world, device, nvme_path, precision, model_kwargs=None, **section):
    import torch.distributed as dist
    extra = {precision: {"enabled": True}} if precision != "fp32" else {}
    path = os.path.join(nvme_path, "swap") if nvme_path else None
    base = _train(world, None, extra, model_kwargs)
    off = _train(world, offload_section(device, path, **section), extra, model_kwargs)
    leftover = os.path.exists(os.path.join(path, "deepscale_param_swap", f"rank{dist.get_rank()}")) if path else False
    return base, off, leftover


def _check(results, device, precision, mixed=False):
    rtol = 1e-6
    for (base, off, leftover) in results:
        losses0, params0, _, _ = base
        losses1, params1, stats, resident = off
        torch.testing.assert_close(torch.tensor(losses1), torch.tensor(losses0), rtol=rtol, atol=0)
        for name, want in params0.items():
            rel = ((params1[name] - want).norm() / want.norm().clamp_min(1e-30)).item()
            assert rel <= rtol, f"{name}: relative difference {rel:.2e}"
        assert stats["device"] == device and stats["groups"] > 3 and stats["loads"] > 0
        assert resident == 0
        if device == "nvme" and mixed:
            assert 0 < stats["nvme_groups"] < stats["groups"] and stats["host_bytes"] > 0
        elif device == "nvme":
            assert stats["nvme_groups"] == stats["groups"]
            assert stats["nvme_bytes_read"] > 0 and stats["nvme_bytes_written"] > 0
            # after the first pass the recorded order is followed: most loads were read ahead
            assert stats["loads_read_ahead"] > 3 * stats["loads_on_demand"], stats
            assert not leftover, "swap files left after engine.destroy()"
        else:
            assert stats["host_bytes"] > 0


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_offload_param_matches_no_offload_fp32(device, tmp_path):
    _check(run_distributed(_parity, 2, args=(2, device, str(tmp_path), "fp32")), device, "fp32")


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_offload_param_matches_no_offload_bf16(device, tmp_path):
    _check(run_distributed(_parity, 2, args=(2, device, str(tmp_path), "bf16")), device, "bf16")


def test_offload_param_nvme_with_frozen_layer_and_checkpointing(tmp_path):
    results = run_distributed(_parity, 2, args=(2, "nvme", str(tmp_path), "fp32",
                                                {"frozen": True, "use_checkpoint": True}))
    _check(results, "nvme", "fp32")


# --- errors: clear, and raised on every rank ---------------------------------------------------
def _expect_error(world, nvme_path, case):
    import errno
    import torch.distributed as dist
    from deepscale.runtime.offload import param_swap_file
    rank = dist.get_rank()
    zero = dict(STAGE3_SMALL, offload_param=offload_section("nvme", os.path.join(nvme_path, "swap")))
    if case == "buffer_size":
        zero["offload_param"]["buffer_size"] = 50
    saved = param_swap_file.ParamSwapDirectory.free_bytes
    if case == "free_space" and rank == 0:
        param_swap_file.ParamSwapDirectory.free_bytes = lambda self: 1000
    try:
        engine = build_gpt_engine(3, world, extra_cfg={}, **zero)
        if case == "disk_full" and rank == 1:
            def full_disk(*args, **kwargs):
                raise OSError(errno.ENOSPC, "async I/O write failed: No space left on device", "group.swp")
            for slot in engine._train_opt.param_offload.nvme.slots:
                slot.handle.async_pwrite = full_disk
        train_gpt(engine, world, range(2))
    except (RuntimeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    finally:
        param_swap_file.ParamSwapDirectory.free_bytes = saved  # the worker process is reused
    return None


@pytest.mark.parametrize("case, kind, words", [
    ("buffer_size", "ValueError", ["offload_param.buffer_size=50 elements is too small", "set buffer_size >= "]),
    ("free_space", "RuntimeError", ["failed on 1 rank(s): rank 0", "only 0.0 MiB are free", "nvme_path"]),
    ("disk_full", "RuntimeError", ["writing the updated parameter shards failed on 1 rank(s): rank 1",
                                   "No space left on device", "nvme_path"]),
])
def test_nvme_errors_are_clear_and_on_every_rank(case, kind, words, tmp_path):
    results = run_distributed(_expect_error, 2, args=(2, str(tmp_path), case))
    for result in results:  # every rank raised (none hung, none went on)
        assert result is not None and result[0] == kind, result
        for word in words:
            assert word in result[1], result[1]


# --- checkpoints: portable in both directions ---------------------------------------------------
CKPT_GLOBAL, SAVED_STEPS, MORE_STEPS = 8, 4, 2


def _ckpt_engine(world, stage, nvme_path, device, model=None):
    zero = dict(STAGE3_SMALL)
    if device is not None:
        zero["offload_param"] = offload_section(device, os.path.join(nvme_path, f"swap{world}{stage}"))
    gas = CKPT_GLOBAL // (2 * world)
    return build_gpt_engine(stage, world, gas=gas, model=model, model_kwargs={"frozen": True}, **zero), gas


def _ckpt_save(world, stage, path, device):
    engine, gas = _ckpt_engine(world, stage, path, device)
    train_gpt(engine, world, range(SAVED_STEPS), gas=gas)
    engine.save_checkpoint(path, tag="ckpt")
    saved = full_params(engine)
    more = train_gpt(engine, world, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS), gas=gas)
    engine.destroy()
    return saved, more


def _ckpt_load(world, stage, path, device):
    from _zero3_models import make_gpt
    engine, gas = _ckpt_engine(world, stage, path, device, model=make_gpt(seed=99, frozen=True))
    engine.load_checkpoint(path, tag="ckpt")
    loaded = full_params(engine)
    more = train_gpt(engine, world, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS), gas=gas)
    engine.destroy()
    return loaded, more


def _check_resumed(saved, more, runs):
    for loaded, loaded_more in runs:
        for name, value in saved.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(torch.tensor(loaded_more), torch.tensor(more), rtol=1e-5, atol=1e-6)


def test_checkpoint_saved_with_params_on_nvme_loads_anywhere(tmp_path):
    path = str(tmp_path)
    saved, more = run_distributed(_ckpt_save, 2, args=(2, 3, path, "nvme"))[0]
    _check_resumed(saved, more, run_distributed(_ckpt_load, 1, args=(1, 0, path, None)))
    _check_resumed(saved, more, run_distributed(_ckpt_load, 2, args=(2, 2, path, None)))
    _check_resumed(saved, more, run_distributed(_ckpt_load, 4, args=(4, 3, path, "cpu")))
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    consolidated = get_fp32_state_dict_from_zero_checkpoint(path, tag="ckpt")
    for name, value in saved.items():
        torch.testing.assert_close(consolidated[name], value, rtol=0, atol=0)


def test_checkpoint_without_offload_loads_with_params_on_nvme(tmp_path):
    path = str(tmp_path)
    saved, more = run_distributed(_ckpt_save, 2, args=(2, 2, path, None))[0]
    _check_resumed(saved, more, run_distributed(_ckpt_load, 2, args=(2, 3, path, "nvme")))


def _built_under_init_for_nvme(world, nvme_path):
    import deepscale.zero
    from _zero3_models import make_gpt
    with deepscale.zero.Init(remote_device="nvme"):
        model = make_gpt()
    zero = dict(STAGE3_SMALL, offload_param=offload_section("nvme", os.path.join(nvme_path, "swap")))
    engine = build_gpt_engine(3, world, model=model, **zero)
    losses = train_gpt(engine, world, range(3))
    engine.destroy()
    plain = build_gpt_engine(3, world, **STAGE3_SMALL)
    want = train_gpt(plain, world, range(3))
    plain.destroy()
    return losses, want


def test_model_built_under_init_with_remote_device_nvme_trains(tmp_path):
    for losses, want in run_distributed(_built_under_init_for_nvme, 2, args=(2, str(tmp_path))):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_offload_param_nvme_with_max_in_cpu_keeps_some_groups_in_host_memory(tmp_path):
    # max_in_cpu of 3000 shard elements keeps the first groups in (pinned, where allowed) host
    # memory and swaps the rest; buffer_count 1 reads one group ahead
    results = run_distributed(_parity, 2, args=(2, "nvme", str(tmp_path), "fp32", None),
                              kwargs=dict(max_in_cpu=3000, buffer_count=1, pin_memory=True))
    _check(results, "nvme", "fp32", mixed=True)


# --- other writers of shards: safe_set_full_fp32_param, GatheredParameters, load_state_dict --------
def _writers(world, nvme_path):
    import deepscale.zero
    from deepscale.utils import safe_set_full_fp32_param
    from _zero3_models import make_gpt
    zero = dict(STAGE3_SMALL, offload_param=offload_section("nvme", os.path.join(nvme_path, "swap")))
    engine = build_gpt_engine(3, world, **zero)
    train_gpt(engine, world, range(1))
    model = engine.module
    safe_set_full_fp32_param(model.blocks[0].fc.weight, torch.full((64, 16), 0.25))
    with deepscale.zero.GatheredParameters(model.blocks[1].out.weight, modifier_rank=0):
        model.blocks[1].out.weight.data.fill_(-0.5)
    fresh = make_gpt(seed=3).state_dict()
    model.load_state_dict({"blocks.0.attn.qkv.weight": fresh["blocks.0.attn.qkv.weight"]}, strict=False)
    engine.empty_partition_cache()
    got = full_params(engine)
    losses = train_gpt(engine, world, range(1, 3))  # trains on from the written values
    engine.destroy()
    return got, fresh["blocks.0.attn.qkv.weight"], losses


def test_writers_of_shards_store_them_back_with_params_on_nvme(tmp_path):
    for got, qkv, losses in run_distributed(_writers, 2, args=(2, str(tmp_path))):
        assert torch.equal(got["blocks.0.fc.weight"], torch.full((64, 16), 0.25))
        assert torch.equal(got["blocks.1.out.weight"], torch.full_like(got["blocks.1.out.weight"], -0.5))
        assert torch.equal(got["blocks.0.attn.qkv.weight"], qkv)
        assert all(torch.isfinite(torch.tensor(losses)))


# --- with the optimizer offloaded too (runs where offload_optimizer is built) ---------------------
def _optimizer_offload_built() -> bool:
    from deepscale.config.features import UNAVAILABLE_FEATURES
    return not any(rule.key == "zero_optimization.offload_optimizer.device" for rule in UNAVAILABLE_FEATURES)


def _both(world, nvme_path, optimizer_device, param_device):
    out = []
    for offload in (False, True):
        zero = dict(STAGE3_SMALL)
        if offload:
            zero["offload_optimizer"] = {"device": optimizer_device, "nvme_path": os.path.join(nvme_path, "opt")}
            zero["offload_param"] = offload_section(param_device, os.path.join(nvme_path, "param"))
        engine = build_gpt_engine(3, world, gas=GAS, clip=CLIP, **zero)
        losses = train_gpt(engine, world, range(NUM_STEPS), gas=GAS)
        out.append((losses, full_params(engine)))
        engine.destroy()
    return out


@pytest.mark.skipif(not _optimizer_offload_built(), reason="offload_optimizer is not built in this tree")
@pytest.mark.parametrize("optimizer_device, param_device", [("cpu", "nvme"), ("nvme", "nvme"), ("nvme", "cpu")])
def test_optimizer_and_params_offloaded_together_match_no_offload(optimizer_device, param_device, tmp_path):
    for (losses0, params0), (losses1, params1) in run_distributed(
            _both, 2, args=(2, str(tmp_path), optimizer_device, param_device)):
        torch.testing.assert_close(torch.tensor(losses1), torch.tensor(losses0), rtol=1e-6, atol=0)
        for name, want in params0.items():
            rel = ((params1[name] - want).norm() / want.norm().clamp_min(1e-30)).item()
            assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"
