"""Monitors: TensorBoard and CSV read-back through a real 2-rank engine, W&B/Comet offline runs,
user events, the plot command and the missing-package error."""
import csv
import glob
import os
import sys

import pytest
import torch

from dist_harness import run_distributed
from deepscale.launcher import runner
from deepscale.monitor import MonitorMaster, MonitorPackageMissing, tags
from deepscale.monitor.csv_monitor import csv_file_name
from deepscale.monitor.plot import main as plot_main, plot_csv_dir

from _monitor_models import SEQ, TokenNet, engine_config, token_batch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MICRO_BS, GAS, WORLD, STEPS = 2, 2, 2, 3
USER_TAG = "Custom/accuracy"


def _train_with_monitors(out_dir, breakdown):
    """Runs on every rank: 3 optimizer steps with TensorBoard and CSV on, plus one user event."""
    import torch.distributed as dist
    import deepscale

    rank = dist.get_rank()
    torch.manual_seed(0)
    monitor_cfg = {"enabled": True, "output_path": out_dir, "job_name": "job"}
    cfg = engine_config(MICRO_BS, GAS, WORLD, tensorboard=dict(monitor_cfg), csv_monitor=dict(monitor_cfg),
                        wall_clock_breakdown=breakdown)
    engine, _, _, _ = deepscale.initialize(model=TokenNet(), config=cfg)
    step_losses = []
    for step in range(STEPS):
        micro_losses = []
        for micro in range(GAS):
            loss = engine(*token_batch(step, micro, rank, MICRO_BS))
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.item())
        step_losses.append(sum(micro_losses) / GAS)
    engine.monitor.write_events([(USER_TAG, 0.75, 7)])
    lrs = engine.get_lr()
    writes = engine.monitor.writes
    engine.destroy()
    return {"writes": writes, "losses": step_losses, "lr": lrs[0], "samples": engine.global_samples}


def _read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [(int(r[0]), float(r[1])) for r in rows[1:]]


@pytest.mark.parametrize("breakdown", [False, True])
def test_tensorboard_and_csv_from_rank0_through_the_engine(tmp_path, breakdown):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = run_distributed(_train_with_monitors, WORLD, args=(str(tmp_path), breakdown))
    assert [r["writes"] for r in results] == [True, False]
    rank0 = results[0]
    samples = [MICRO_BS * GAS * WORLD * (i + 1) for i in range(STEPS)]
    assert rank0["samples"] == samples[-1]
    expected = {t.name for t in tags.STEP_TAGS} | {USER_TAG}
    if breakdown:
        expected |= {t.name for t in tags.BREAKDOWN_TAGS}
    job_dir = tmp_path / "job"

    event_files = glob.glob(str(job_dir / "events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # rank 1 wrote nothing
    acc = EventAccumulator(str(job_dir))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == expected
    for tag in expected - {USER_TAG}:
        assert [e.step for e in acc.Scalars(tag)] == samples, tag
    assert [(e.step, e.value) for e in acc.Scalars(USER_TAG)] == [(7, 0.75)]
    assert [e.value for e in acc.Scalars(tags.TRAIN_LOSS)] == pytest.approx(rank0["losses"], rel=1e-5)
    assert acc.Scalars(tags.LR)[-1].value == pytest.approx(rank0["lr"])
    assert [e.value for e in acc.Scalars(tags.LOSS_SCALE)] == [1.0] * STEPS
    tokens_per_step = MICRO_BS * SEQ * GAS * WORLD
    for tps, sps, ms in zip(acc.Scalars(tags.TOKENS_PER_SEC), acc.Scalars(tags.SAMPLES_PER_SEC),
                            acc.Scalars(tags.STEP_TIME_MS)):
        assert tps.value == pytest.approx(tokens_per_step / (ms.value / 1e3), rel=1e-4)
        assert sps.value == pytest.approx(MICRO_BS * GAS * WORLD / (ms.value / 1e3), rel=1e-4)

    csv_files = sorted(os.listdir(job_dir / ".." / "job"))
    assert {f for f in csv_files if f.endswith(".csv")} == {csv_file_name(t) for t in expected}
    header, rows = _read_csv(job_dir / csv_file_name(tags.TRAIN_LOSS))
    assert header == ["step", "train_loss"]
    assert [s for s, _ in rows] == samples  # one row per step: rank 1 appended nothing
    assert [v for _, v in rows] == pytest.approx(rank0["losses"], rel=1e-5)
    assert _read_csv(job_dir / csv_file_name(USER_TAG)) == (["step", "accuracy"], [(7, 0.75)])


def test_csv_monitor_appends_across_runs_and_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the matplotlib package is not installed (pip install matplotlib)")
    cfg = {"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "run"}}
    for first in (0, 3):
        master = MonitorMaster(cfg)
        master.write_events([(tags.TRAIN_LOSS, 1.0 / (s + 1), 8 * (s + 1)) for s in range(first, first + 3)])
        master.write_events([(tags.LR, 0.1, 8 * (s + 1)) for s in range(first, first + 3)])
        master.write_events([(tags.SAMPLES_PER_SEC, 100.0 + s, 8 * (s + 1)) for s in range(first, first + 3)])
        master.close()
    header, rows = _read_csv(tmp_path / "run" / csv_file_name(tags.TRAIN_LOSS))
    assert header == ["step", "train_loss"] and [s for s, _ in rows] == [8, 16, 24, 32, 40, 48]

    out = tmp_path / "curves.png"
    assert runner.main(["plot", str(tmp_path / "run"), "-o", str(out)]) == 0  # the `deepscale plot` command
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert plot_main([str(tmp_path)]) == 2  # a directory without monitor files
    with pytest.raises(ValueError, match="no monitor CSV files"):
        plot_csv_dir(str(tmp_path))


def test_tensorboard_events_are_readable_after_flush(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    master = MonitorMaster({"tensorboard": {"enabled": True, "output_path": str(tmp_path), "job_name": "tb"}})
    master.write_events([(tags.TRAIN_LOSS, 2.0, 8), (tags.LR, 0.5, 8)])
    master.write_events([(tags.TRAIN_LOSS, 1.5, 16), ("Eval/loss", 1.25, 16)])
    master.flush()  # before close: the run is still open
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars(tags.TRAIN_LOSS)] == [(8, 2.0), (16, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("Eval/loss")] == [(16, 1.25)]
    master.close()


def test_write_events_rejects_malformed_events(tmp_path):
    master = MonitorMaster({"csv_monitor": {"enabled": True, "output_path": str(tmp_path)}})
    with pytest.raises(TypeError, match="write_events"):
        master.write_events([("loss", 1.0)])
    master.close()


@pytest.mark.parametrize("section, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("comet", "comet_ml")])
def test_missing_package_error_names_the_pip_package(monkeypatch, section, module):
    monkeypatch.setitem(sys.modules, module, None)  # find_spec then reports it as not installed
    with pytest.raises(MonitorPackageMissing, match=f"pip install {module}") as info:
        MonitorMaster({section: {"enabled": True}})
    assert f"{section}.enabled" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    master = MonitorMaster({"wandb": {"enabled": True, "project": "deepscale-test"}})
    master.write_events([(tags.TRAIN_LOSS, 0.5, 8), (tags.LR, 0.1, 8), (tags.TRAIN_LOSS, 0.4, 16)])
    master.close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    assert glob.glob(os.path.join(runs[0], "*.wandb")), os.listdir(runs[0])


def test_comet_offline_experiment(tmp_path, monkeypatch):
    comet_ml = pytest.importorskip("comet_ml", reason="the comet_ml package is not installed (pip install comet_ml)")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path))
    master = MonitorMaster({"comet": {"enabled": True, "online": False, "project": "deepscale-test",
                                      "samples_log_interval": 16}})
    experiment = master.monitors[0].experiment
    assert isinstance(experiment, comet_ml.OfflineExperiment)
    logged = []
    monkeypatch.setattr(experiment, "log_metric", lambda name, value, step=None, **kw: logged.append((name, step)))
    master.write_events([(tags.TRAIN_LOSS, 0.5, s) for s in (8, 16, 24, 32, 40)] + [("Eval/acc", 0.9, 3)])
    # Train/Samples tags are thinned to one per 16 samples; other tags always pass.
    assert logged == [(tags.TRAIN_LOSS, 8), (tags.TRAIN_LOSS, 24), (tags.TRAIN_LOSS, 40), ("Eval/acc", 3)]
    master.close()
    assert glob.glob(str(tmp_path / "*.zip")), os.listdir(tmp_path)


def test_monitoring_doc_lists_exactly_the_code_tags():
    with open(os.path.join(REPO, "docs", "monitoring.md"), encoding="utf-8") as handle:
        doc = handle.read()
    assert tags.tags_markdown() in doc, ("docs/monitoring.md is out of date; paste "
                                         "deepscale.monitor.tags.tags_markdown() into it")


def _fp16_csv_body(out_dir):
    import torch.distributed as dist
    import deepscale

    cfg = engine_config(2, 1, dist.get_world_size(), fp16={"enabled": True, "initial_scale_power": 4},
                        csv_monitor={"enabled": True, "output_path": out_dir, "job_name": "fp16"})
    engine, _, _, _ = deepscale.initialize(model=TokenNet(), config=cfg)
    scales = []
    for step in range(2):
        engine.backward(engine(*token_batch(step, 0, dist.get_rank(), 2)))
        engine.step()
        scales.append(engine.loss_scale)  # the tag holds the scale after the step
    engine.destroy()
    return scales


def test_loss_scale_tag_follows_the_fp16_loss_scale(tmp_path):
    scales = run_distributed(_fp16_csv_body, 2, args=(str(tmp_path),))[0]
    header, rows = _read_csv(tmp_path / "fp16" / csv_file_name(tags.LOSS_SCALE))
    assert header == ["step", "loss_scale"]
    assert rows == [(4, scales[0]), (8, scales[1])] and scales[0] == 16.0
