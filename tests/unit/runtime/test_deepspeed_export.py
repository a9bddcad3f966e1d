"""Export of a deepscale checkpoint to DeepSpeed's universal layout.

Always: the export loads back into deepscale (through the DeepSpeed reader) at another world size
and continues like the original run. When a Python with DeepSpeed 0.19.8 is available
(``DEEPSCALE_DEEPSPEED_PYTHON``, default /work/venv-ds/bin/python), DeepSpeed itself loads the
export at ZeRO stages 1 and 3 (stage 2 reads it like 1) and must continue with the same losses
within 1e-6 (fp32).
"""
import json
import os
import subprocess
import sys

import pytest

from dist_harness import run_distributed

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "fixtures",
                        "deepspeed_ckpt")
sys.path.insert(0, FIXTURES)
from fixture_model import STEPS_AFTER_SAVE, STEPS_BEFORE_SAVE, ds_config, make_model, rank_batch  # noqa: E402

TOL = 1e-6
DS_PYTHON = os.environ.get("DEEPSCALE_DEEPSPEED_PYTHON", "/work/venv-ds/bin/python")


def _train(engine, steps, world_size):
    import torch.distributed as dist
    losses = []
    for step in steps:
        x, y = rank_batch(step, dist.get_rank(), world_size)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _save_then_continue(stage, ckpt_dir):
    import deepscale
    engine = deepscale.initialize(model=make_model(), config=ds_config(stage, 2))[0]
    _train(engine, range(STEPS_BEFORE_SAVE), 2)
    engine.save_checkpoint(ckpt_dir, client_state={"note": "from deepscale"})
    losses = _train(engine, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE), 2)
    engine.destroy()
    return losses


def _load_export(export_dir, stage, world_size):
    import deepscale
    engine = deepscale.initialize(model=make_model(), config=ds_config(stage, world_size))[0]
    _, client = engine.load_checkpoint(export_dir)
    restored = (engine.global_steps, engine.get_lr(), client)
    losses = _train(engine, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE), world_size)
    engine.destroy()
    return restored, losses


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from deepscale.runtime.checkpoint.deepspeed_export import export_to_deepspeed_universal
    root = tmp_path_factory.mktemp("export")
    per_rank = run_distributed(_save_then_continue, 2, args=(2, str(root / "deepscale")))
    path = export_to_deepspeed_universal(str(root / "deepscale"), str(root / "universal"))
    return str(root / "universal"), path, per_rank


def test_export_writes_the_universal_layout(exported):
    out_dir, path, _ = exported
    assert open(os.path.join(out_dir, "latest_universal")).read() == os.path.basename(path)
    for name in ("layers.0.weight", "layers.2.bias"):
        assert sorted(os.listdir(os.path.join(path, "zero", name))) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt",
                                                                        "step.pt"]
    assert not os.path.exists(os.path.join(path, "zero", "out_scale"))  # buffers stay in the module states


def test_export_loads_back_into_deepscale_at_one_rank(exported):
    out_dir, _, per_rank = exported
    (steps, lr, client), losses = run_distributed(_load_export, 1, args=(out_dir, 3, 1))[0]
    assert steps == STEPS_BEFORE_SAVE and lr == [pytest.approx(0.004)] and client == {"note": "from deepscale"}
    want = [sum(values) / 2 for values in zip(*per_rank)]
    assert losses == pytest.approx(want, abs=TOL, rel=0)


def _deepspeed_available() -> bool:
    if not os.path.isfile(DS_PYTHON):
        return False
    probe = subprocess.run([DS_PYTHON, "-c", "import deepspeed; assert deepspeed.__version__ == '0.19.8'"],
                           capture_output=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    return probe.returncode == 0


def test_deepspeed_continues_from_the_export(exported, tmp_path):
    if not _deepspeed_available():
        pytest.skip(f"needs DeepSpeed 0.19.8 at {DS_PYTHON} (set DEEPSCALE_DEEPSPEED_PYTHON)")
    out_dir, _, per_rank = exported
    result_file = str(tmp_path / "ds.json")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([DS_PYTHON, os.path.join(FIXTURES, "make_fixtures.py"), "--continue-universal", out_dir,
                           "--stages", "1,3", "--out", result_file],
                          capture_output=True, text=True, env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(result_file) as handle:
        by_stage = json.load(handle)
    assert sorted(by_stage) == ["1", "3"]
    for stage, ds_ranks in by_stage.items():
        for rank, (ds, ours) in enumerate(zip(ds_ranks, per_rank)):
            assert ds["global_steps"] == STEPS_BEFORE_SAVE and ds["lr"] == [pytest.approx(0.004)]
            assert ds["losses"] == pytest.approx(ours, abs=TOL, rel=0), f"rank {rank}, DeepSpeed stage {stage}"
