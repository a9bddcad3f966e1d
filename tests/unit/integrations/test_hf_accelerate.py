"""``accelerate launch`` with a DeepSpeed plugin config, on deepscale through the shim.

Two processes train a tiny GPT-2 with a plain Accelerate loop (DummyOptim/DummyScheduler, "auto"
values filled by Accelerate) at ZeRO-2 and ZeRO-3, ``save_state`` after step 5, and a fresh
Accelerator ``load_state``s and continues: its losses must equal the uninterrupted run's.
"""
import json
import math
import sys

import pytest

pytest.importorskip("transformers", reason="the Accelerate test builds a transformers GPT-2")
pytest.importorskip("accelerate", reason="the Accelerate tests need accelerate")

from _hf_helpers import HERE, free_port, run_checked, shim_env  # noqa: E402
from hf_common import accelerate_ds_config, write_accelerate_config, write_json  # noqa: E402


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_trains_saves_and_resumes(shim_dir, tmp_path, stage):
    write_json(str(tmp_path / "ds.json"), accelerate_ds_config(stage))
    write_accelerate_config(str(tmp_path / "accelerate.yaml"), str(tmp_path / "ds.json"), num_processes=2,
                            port=free_port(), zero3_init=stage == 3)
    result_file = tmp_path / "result.json"
    run_checked([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml"),
                 str(HERE / "hf_accelerate_script.py"), "--result", str(result_file), "--ckpt",
                 str(tmp_path / "ckpt")], env=shim_env(shim_dir), cwd=tmp_path)
    result = json.loads(result_file.read_text())
    first, resumed = result["first"], result["resumed"]

    losses = [first["losses"][str(step)] for step in range(1, 11)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert first["engine_global_steps"] == 10 and first["gas"] == 2
    assert first["is_engine"] and first["unwrapped_is_model"] and first["was_step_applied"]
    assert first["partitioned_at_build"] == (stage == 3)  # zero3_init_flag builds inside zero.Init
    assert first["state_dict_full_shapes"] and first["state_dict_keys"] > 0  # get_state_dict gathers
    assert (tmp_path / "ckpt" / "pytorch_model" / "mp_rank_00_model_states.pt").is_file()

    assert resumed["engine_global_steps"] == 10
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(6, 11)]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(first["losses"][step], rel=1e-5, abs=1e-6), step
    assert resumed["state_dict_sum"] == pytest.approx(first["state_dict_sum"], rel=1e-6)
