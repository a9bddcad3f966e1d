"""Stage-3 checkpoints are portable: saved at N ranks they load at M ranks and at stages 0-2,
checkpoints of other stages load into stage 3, and zero_to_fp32 consolidates them.

Every run keeps the global batch at 8 samples (ranks x accumulation steps x 2), so a resumed
run must continue with the same losses as the run that saved.
"""
import pytest
import torch

from dist_harness import run_distributed
from _zero3_helpers import STAGE3_SMALL, build_gpt_engine, full_params, train_gpt

GLOBAL = 8
# 4 saved steps keep micro_steps a multiple of every accumulation count used (1, 2, 4): the
# engine restores micro_steps, which places the next accumulation boundary.
SAVED_STEPS, MORE_STEPS = 4, 2
MODEL = {"frozen": True}


def _gas(world):
    return GLOBAL // (2 * world)


def _save(world, stage, path):
    engine = build_gpt_engine(stage, world, gas=_gas(world), model_kwargs=MODEL, **STAGE3_SMALL)
    train_gpt(engine, world, range(SAVED_STEPS), gas=_gas(world))
    engine.save_checkpoint(path, tag="ckpt")
    saved = full_params(engine)
    more = train_gpt(engine, world, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS), gas=_gas(world))
    engine.destroy()
    return saved, more


def _load(world, stage, path):
    from _zero3_models import make_gpt
    model = make_gpt(seed=99, **MODEL)  # other initial weights: everything must come from the checkpoint
    engine = build_gpt_engine(stage, world, gas=_gas(world), model=model, **STAGE3_SMALL)
    engine.load_checkpoint(path, tag="ckpt")
    loaded = full_params(engine)
    more = train_gpt(engine, world, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS), gas=_gas(world))
    steps = engine.global_steps
    engine.destroy()
    return loaded, more, steps


def _check_resume(saved, more, loaded_runs):
    for loaded, loaded_more, steps in loaded_runs:
        assert steps == SAVED_STEPS + MORE_STEPS
        for name, value in saved.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(torch.tensor(loaded_more), torch.tensor(more), rtol=1e-5, atol=1e-6)


def test_stage3_checkpoint_loads_at_other_world_sizes_and_stages(tmp_path):
    path = str(tmp_path)
    saved, more = run_distributed(_save, 2, args=(2, 3, path))[0]
    _check_resume(saved, more, run_distributed(_load, 4, args=(4, 3, path)))
    _check_resume(saved, more, run_distributed(_load, 1, args=(1, 0, path)))
    _check_resume(saved, more, run_distributed(_load, 2, args=(2, 2, path)))

    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    consolidated = get_fp32_state_dict_from_zero_checkpoint(path, tag="ckpt")
    for name, value in saved.items():
        torch.testing.assert_close(consolidated[name], value, rtol=0, atol=0)
    assert torch.equal(consolidated["lm_head.weight"], consolidated["wte.weight"])


@pytest.mark.parametrize("saved_world, saved_stage, load_world", [(2, 2, 4), (1, 0, 2)])
def test_other_stages_load_into_stage3(tmp_path, saved_world, saved_stage, load_world):
    path = str(tmp_path)
    saved, more = run_distributed(_save, saved_world, args=(saved_world, saved_stage, path))[0]
    _check_resume(saved, more, run_distributed(_load, load_world, args=(load_world, 3, path)))


def _save_16bit(world, path, enabled):
    engine = build_gpt_engine(3, world, model_kwargs=MODEL, extra_cfg=None, **STAGE3_SMALL,
                              stage3_gather_16bit_weights_on_model_save=enabled)
    train_gpt(engine, world, range(2))
    written = engine.save_16bit_model(path, "model.bin")
    params = full_params(engine)
    engine.empty_partition_cache()
    engine.destroy()
    return written, params


def test_save_16bit_model_writes_whole_weights_only_when_enabled(tmp_path):
    import os
    written, params = run_distributed(_save_16bit, 2, args=(2, str(tmp_path / "off"), False))[0]
    assert written is False and not os.path.exists(tmp_path / "off" / "model.bin")
    written, params = run_distributed(_save_16bit, 2, args=(2, str(tmp_path / "on"), True))[0]
    state = torch.load(tmp_path / "on" / "model.bin", weights_only=True)
    assert written is True
    for name, value in params.items():
        torch.testing.assert_close(state[name].float(), value, rtol=0, atol=0)
    assert torch.equal(state["lm_head.weight"], state["wte.weight"])
