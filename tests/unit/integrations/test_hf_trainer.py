"""Hugging Face Trainer with a DeepSpeed config ("auto" values), on deepscale through the shim.

Two processes under the ``deepscale`` launcher train a tiny GPT-2 built from a config for 10 steps
at ZeRO-2 and ZeRO-3, save checkpoints, and a fresh Trainer resumes from step 5: the resumed
losses and final weights must equal the uninterrupted run's.
"""
import json
import math
import sys

import pytest

pytest.importorskip("transformers", reason="the Hugging Face Trainer tests need transformers")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate for DeepSpeed")

from _hf_helpers import HERE, REPO, free_port, run_checked, shim_env  # noqa: E402


# hf_optimizer: no optimizer/scheduler sections, so the Trainer's AdamW and linear schedule go to the engine.
@pytest.mark.parametrize("stage,hf_optimizer", [(2, False), (3, False), (3, True)])
def test_trainer_trains_saves_and_resumes(shim_dir, tmp_path, stage, hf_optimizer):
    result_file = tmp_path / "result.json"
    run_checked([sys.executable, "-m", "deepscale.launcher", "--num_procs", "2", "--master_port", str(free_port()),
                 str(HERE / "hf_trainer_script.py"), "--stage", str(stage), "--out", str(tmp_path / "out"),
                 "--result", str(result_file)] + (["--hf_optimizer"] if hf_optimizer else []),
                env=shim_env(shim_dir), cwd=REPO)
    result = json.loads(result_file.read_text())
    first, resumed = result["first"], result["resumed"]

    losses = [first["losses"][str(step)] for step in range(1, 11)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # it learns
    assert first["global_step"] == first["engine_global_steps"] == 10
    assert first["is_engine"] and first["config_stage"] == stage
    assert first["micro_batch"] == 2  # "auto" filled in from per_device_train_batch_size
    assert first["partitioned_at_build"] == (stage == 3)  # ZeRO-3 builds the model inside zero.Init
    assert first["saved_full_shapes"] and first["saved_weight_keys"] > 0
    assert first["zero_to_fp32_matches"] and first["zero_to_fp32_keys"] == first["saved_weight_keys"]
    if hf_optimizer:
        assert first["lr"] == 0.0  # the Trainer's linear schedule, stepped by the engine, ends at 0

    step5 = tmp_path / "out" / "run" / "checkpoint-5"
    assert (step5 / "latest").read_text().strip() == "global_step5"
    assert (step5 / "global_step5" / "mp_rank_00_model_states.pt").is_file()

    # Resuming from step 5 continues exactly where the uninterrupted run was.
    assert resumed["global_step"] == resumed["engine_global_steps"] == 10
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(6, 11)]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(first["losses"][step], rel=1e-5, abs=1e-6), step
    assert resumed["saved_weight_sum"] == pytest.approx(first["saved_weight_sum"], rel=1e-6)
    assert math.isfinite(first["eval_loss"])  # Trainer.evaluate through the engine
    assert resumed["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)
