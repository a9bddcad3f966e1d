"""The ``flops_profiler`` config section through the engine on 2 gloo ranks: ZeRO 0 and 3, with and
without activation checkpointing, against the analytic count and FlopCounterMode."""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_harness import run_distributed
from flops_gpt import GPT, analytic_flops, batch_of

SHAPE = dict(vocab=512, d_model=256, num_layers=2, seq=64, batch=2)
WORLD = 2


def _model(checkpoint):
    torch.manual_seed(0)
    if checkpoint == "deepscale":  # DeepSpeed's API: deepscale.checkpointing.checkpoint (reentrant)
        import deepscale
        model = GPT(**{k: v for k, v in SHAPE.items() if k != "batch"},
                    checkpoint_fn=lambda block, x: deepscale.checkpointing.checkpoint(block, x))
    else:
        model = GPT(**{k: v for k, v in SHAPE.items() if k != "batch"}, checkpoint=checkpoint)
    return model


def _train(stage, checkpoint, out_dir, gas):
    import torch.distributed as dist
    import deepscale

    rank = dist.get_rank()
    model = _model(checkpoint)
    cfg = {"train_micro_batch_size_per_gpu": SHAPE["batch"], "gradient_accumulation_steps": gas,
           "steps_per_print": 1000, "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
           "zero_optimization": {"stage": stage},
           "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": 2, "top_modules": 2,
                              "output_file": os.path.join(out_dir, f"profile_{stage}_{checkpoint}.txt")}}
    if checkpoint == "deepscale":
        cfg["activation_checkpointing"] = {"partition_activations": False}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    hooks_before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in engine.module.modules()]
    for step in range(3):
        for micro in range(gas):
            ids, labels = batch_of(SHAPE["vocab"], SHAPE["seq"], SHAPE["batch"], seed=100 * step + 10 * micro + rank)
            engine.backward(engine(ids, labels))
            engine.step()
        if step == 1:
            hooks_during = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in engine.module.modules()]
    hooks_after = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in engine.module.modules()]
    summary = engine._flops.last_profile
    engine.destroy()
    return {"summary": summary, "hooks_restored": hooks_before == hooks_after == hooks_during,
            "dispatch_stack": torch._C._len_torch_dispatch_stack()}


def _flop_counter_reference(checkpoint):
    model = _model("reentrant" if checkpoint == "deepscale" else checkpoint)
    ids, labels = batch_of(SHAPE["vocab"], SHAPE["seq"], SHAPE["batch"])
    with FlopCounterMode(display=False) as reference:
        model(ids, labels).backward()
    return reference.get_total_flops()


@pytest.mark.parametrize("stage, checkpoint", [(0, "none"), (3, "none"), (0, "deepscale"), (3, "deepscale"),
                                               (3, "non_reentrant")])
def test_engine_profile_step_matches_analytic_and_flop_counter_mode(tmp_path, stage, checkpoint):
    results = run_distributed(_train, WORLD, args=(stage, checkpoint, str(tmp_path), 1), timeout=240)
    assert results[1]["summary"] is None  # rank 0 profiles, as DeepSpeed
    summary = results[0]["summary"]
    expected = analytic_flops(**SHAPE)
    phases = summary["phases"]
    # ZeRO-3: parameters at their full size, though each rank holds half of them.
    assert summary["params"] == sum(p.numel() for p in _model("none").parameters())
    assert summary["training_flops"] == pytest.approx(expected["train"], rel=0.01)
    assert summary["hardware_flops"] == _flop_counter_reference(checkpoint)
    assert 1.0 < summary["all_flops"] / summary["hardware_flops"] < 1.01
    if checkpoint == "none":
        assert phases["recompute"]["flops"] == 0
    elif checkpoint == "deepscale":
        assert phases["recompute"]["flops"] == pytest.approx(expected["block_forward"], rel=0.01)
    else:
        assert 0 < phases["recompute"]["flops"] < expected["block_forward"]
    assert summary["hardware_flops"] == summary["training_flops"] + phases["recompute"]["flops"]
    assert summary["micro_batches"] == 1 and summary["model_tflops"] > 0 and summary["mfu"] is None
    assert summary["tokens_per_s"] > 0 and summary["samples_per_s"] > 0
    assert all(summary["latency_s"][k] > 0 for k in ("forward", "backward", "step"))
    assert all(r["hooks_restored"] and r["dispatch_stack"] == 0 for r in results)
    text = (tmp_path / f"profile_{stage}_{checkpoint}.txt").read_text()
    assert "Profile summary at step 1" in text and "data parallel size:" in text and "iter latency:" in text
    assert "latencies measured at:" in text and "step 2, not profiled" in text


def test_engine_profile_sums_the_micro_batches_of_the_step(tmp_path):
    results = run_distributed(_train, WORLD, args=(0, "none", str(tmp_path), 2), timeout=240)
    summary = results[0]["summary"]
    assert summary["micro_batches"] == 2
    assert summary["training_flops"] == pytest.approx(2 * analytic_flops(**SHAPE)["train"], rel=0.01)


def test_engine_reports_mfu_against_a_given_peak(tmp_path, monkeypatch):
    import deepscale

    monkeypatch.setenv("DEEPSCALE_PEAK_TFLOPS", "0.5")
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    cfg = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
           "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
           "flops_profiler": {"enabled": True, "profile_step": 2, "detailed": False,
                              "output_file": str(tmp_path / "p.txt")}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert engine.flops_profiler is not None
    for step in range(4):
        engine.backward(engine(torch.randn(4, 32)).pow(2).mean())
        engine.step()
        if step < 2:
            assert engine._flops.last_profile is None
    summary = engine._flops.last_profile
    assert summary["mfu"] == pytest.approx(summary["model_tflops"] / 0.5)
    text = (tmp_path / "p.txt").read_text()
    assert "MFU (peak 500 GFLOPS)" in text and "Profile summary at step 2" in text and "detailed" not in text
    engine.destroy()


def test_engine_reports_at_destroy_when_training_stops_after_the_profiled_step(tmp_path, capsys):
    import deepscale

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
           "optimizer": {"type": "SGD", "params": {"lr": 0.01}}, "flops_profiler": {"enabled": True, "profile_step": 1}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 8)).sum())
        engine.step()
    assert engine._flops.last_profile is None  # step 1 counted; its timing step (2) has not run
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks
    engine.destroy()
    assert "while profiled" in engine._flops.last_profile["latency_source"]
    out = capsys.readouterr().out
    assert "Profile summary at step 1" in out and "while profiled (includes the profiler's cost" in out


def test_engine_profiler_attributes_after_training(tmp_path):
    # DeepSpeed users read engine.flops_profiler.flops / .params after training past the profiled step.
    import deepscale

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10))
    loss_fn = torch.nn.CrossEntropyLoss()
    cfg = {"train_batch_size": 1, "steps_per_print": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.001}},
           "flops_profiler": {"enabled": True, "module_depth": -1, "top_modules": 3,
                              "output_file": str(tmp_path / "p.txt")}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for _ in range(4):
        x, y = torch.randn(1, 10), torch.randint(0, 10, (1,))
        engine.backward(loss_fn(engine(x), y))
        engine.step()
    assert engine.flops_profiler.flops == 200 and engine.flops_profiler.params == 110
    engine.destroy()
