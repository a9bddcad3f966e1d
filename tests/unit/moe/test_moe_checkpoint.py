"""MoE checkpoints on 4 gloo ranks: saved at EP=4, loaded at EP=2 and EP=1 with the same next-step
loss; one file per expert; zero_to_fp32 returns every expert under its global name."""
import os

import pytest
import torch

from dist_harness import run_distributed
from moe._moe_models import MoENet, NUM_EXPERTS, batch, build_engine

WORLD = 4


def _ckpt_body(save_dir, save_stage, load_stage):
    import torch.distributed as dist
    rank = dist.get_rank()
    engine = build_engine(save_stage, 4, optimizer="Adam", lr=1e-2)
    for step in range(2):
        loss = engine(*batch(step, rank))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(save_dir, tag="t")
    expected = float(engine(*batch(2, rank)))
    engine.destroy()
    got = {}
    for ep_size in (2, 1):
        engine = build_engine(load_stage, ep_size, optimizer="Adam", lr=1e-2)
        engine.load_checkpoint(save_dir, tag="t")
        got[ep_size] = float(engine(*batch(2, rank)))
        # one more step on the loaded state: optimizer states must have been resharded too
        loss = engine(*batch(2, rank))
        engine.backward(loss)
        engine.step()
        got[(ep_size, "after")] = float(engine(*batch(3, rank)))
        engine.destroy()
    engine = build_engine(save_stage, 4, optimizer="Adam", lr=1e-2)
    engine.load_checkpoint(save_dir, tag="t")
    loss = engine(*batch(2, rank))
    engine.backward(loss)
    engine.step()
    got[(4, "after")] = float(engine(*batch(3, rank)))
    engine.destroy()
    return expected, got


@pytest.mark.parametrize("save_stage, load_stage", [(0, 0), (2, 3), (3, 1)])
def test_ep4_checkpoint_loads_at_ep2_and_ep1_with_the_same_next_loss(tmp_path, save_stage, load_stage):
    results = run_distributed(_ckpt_body, WORLD, args=(str(tmp_path), save_stage, load_stage), timeout=240)
    files = sorted(os.listdir(tmp_path / "t"))
    assert [f for f in files if f.startswith("layer_0_expert_")] == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(NUM_EXPERTS)]
    for rank, (expected, got) in enumerate(results):
        for ep_size in (2, 1):
            assert got[ep_size] == pytest.approx(expected, rel=1e-6), (rank, ep_size, got[ep_size], expected)
            assert got[(ep_size, "after")] == pytest.approx(got[(4, "after")], rel=1e-5), (rank, ep_size)
    # zero_to_fp32: a plain EP=1 model loads the consolidated state strictly and computes the same loss
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="t")
    model = MoENet()
    model.load_state_dict(state, strict=True)
    model.eval()
    for rank, (expected, _) in enumerate(results):
        with torch.no_grad():
            assert float(model(*batch(2, rank))) == pytest.approx(expected, rel=1e-6)


def _save16_body(save_dir, stage):
    import torch.distributed as dist
    engine = build_engine(stage, 2, extra_config={"zero_optimization": {
        "stage": stage, "stage3_gather_16bit_weights_on_model_save": True}})
    loss = engine(*batch(0, dist.get_rank()))
    engine.backward(loss)
    engine.step()
    assert engine.save_16bit_model(save_dir)
    value = float(engine(*batch(1, dist.get_rank())))
    engine.destroy()
    return value


@pytest.mark.parametrize("stage", [1, 3])
def test_save_16bit_model_at_ep2_holds_every_expert(tmp_path, stage):
    losses = run_distributed(_save16_body, WORLD, args=(str(tmp_path), stage), timeout=180)
    model = MoENet()
    model.load_state_dict(torch.load(tmp_path / "pytorch_model.bin"), strict=True)
    for rank, want in enumerate(losses):
        with torch.no_grad():
            assert float(model(*batch(1, rank))) == pytest.approx(want, rel=1e-6)


def test_zero_to_fp32_takes_frozen_experts_from_their_files(tmp_path):
    from deepscale.utils.zero_to_fp32 import MODEL_STATES_FILE, get_fp32_state_dict_from_zero_checkpoint
    torch.save({"format_version": 2, "module": {"inp.weight": torch.ones(2)}, "num_optimizer_shards": 0},
               tmp_path / MODEL_STATES_FILE)
    torch.save({"moe.deepspeed_moe.experts.deepspeed_experts.3.weight": torch.full((2, 2), 3.0, dtype=torch.bfloat16)},
               tmp_path / "layer_0_expert_3_mp_rank_00_model_states.pt")
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    assert list(state) == ["inp.weight", "moe.deepspeed_moe.experts.deepspeed_experts.3.weight"]
    assert state["moe.deepspeed_moe.experts.deepspeed_experts.3.weight"].dtype == torch.float32
    assert "moe.deepspeed_moe.experts.deepspeed_experts.3.weight" not in get_fp32_state_dict_from_zero_checkpoint(
        str(tmp_path), exclude_frozen_parameters=True)
