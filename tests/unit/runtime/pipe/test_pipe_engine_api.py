"""The pipeline engine's API: stage queries, refusals of forward/backward/step, eval_batch, user errors,
shape re-negotiation, fp16 overflow across stages."""
import pytest
import torch

from dist_harness import run_distributed
from pipe_models import layer_specs, micro_batch, mse


def _engine(pp=2, dp=1, gas=2, extra=None, schedule="1f1b", **module_kw):
    import deepscale
    from deepscale.pipe import PipelineModule, PipeDataParallelTopology
    model = PipelineModule(layer_specs(3), topology=PipeDataParallelTopology(pp, dp), loss_fn=mse, seed_layers=True,
                           partition_method="uniform", **module_kw)
    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": gas,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "steps_per_print": 10**6,
              "pipeline": {"schedule": schedule}, **(extra or {})}
    engine, _, _, _ = deepscale.initialize(model=model, config=config)
    return engine


def _api_body():
    from deepscale.runtime.pipe.engine import PipelineEngine, PipelineError
    engine = _engine()
    out = {"type": isinstance(engine, PipelineEngine), "first": engine.is_first_stage(),
           "last": engine.is_last_stage(), "stage": engine.stage_id}
    for call in (lambda: engine(torch.zeros(3, 8)), lambda: engine.backward(torch.zeros(())), lambda: engine.step()):
        try:
            call()
            out.setdefault("refused", []).append(False)
        except PipelineError as err:
            out.setdefault("refused", []).append("train_batch" in str(err))
    # Only the first and last stages need data: the middle of a 2-stage pipe has none, so pass None there.
    data = iter([micro_batch(0, k) for k in range(2)])
    out["loss"] = float(engine.train_batch(data))
    eval_data = iter([micro_batch(5, k) for k in range(2)])
    loss, logits = engine.eval_batch(eval_data, return_logits=True)
    out["eval_loss"] = float(loss)
    out["logits"] = None if logits is None else [tuple(t.shape) for t in logits]
    out["steps"] = engine.global_steps
    # A shorter batch changes the shapes between stages: they are negotiated again.
    exchanges = engine.channel.meta_exchanges
    engine.eval_batch(iter([micro_batch(6, k, micro_bs=2) for k in range(2)]))
    out["renegotiated"] = engine.channel.meta_exchanges > exchanges or engine.is_first_stage()
    return out


def test_stage_queries_refusals_and_eval():
    results = run_distributed(_api_body, 2)
    assert [r["type"] for r in results] == [True, True]
    assert [(r["first"], r["last"], r["stage"]) for r in results] == [(True, False, 0), (False, True, 1)]
    assert all(r["refused"] == [True, True, True] for r in results)
    assert results[0]["loss"] == results[1]["loss"] and results[0]["eval_loss"] == results[1]["eval_loss"]
    assert results[0]["logits"] is None and results[1]["logits"] == [(3, 4), (3, 4)]
    assert all(r["steps"] == 1 for r in results)
    assert all(r["renegotiated"] for r in results)
    # The eval loss is the reference model's loss on those micro-batches after one SGD step.
    from pipe_models import reference_training
    _, modules = reference_training(layer_specs(3), 1, 2, 1, mse)
    expected = 0.0
    for k in range(2):
        x, y = micro_batch(5, k)
        for m in modules:
            x = m(x)
        expected += mse(x, y).item() / 2
    assert results[0]["eval_loss"] == pytest.approx(expected, rel=1e-6)


def _error_body(case):
    from deepscale.pipe import PipelineModule
    try:
        if case == "too_few_layers":
            PipelineModule(layer_specs(0), num_stages=2, loss_fn=mse)
        elif case == "empty_stage":
            PipelineModule(layer_specs(3), num_stages=2, loss_fn=mse, partition_method=[0, 0, 4])
        elif case == "gas_not_multiple":
            _engine(gas=3, schedule="interleaved_1f1b", num_virtual_stages=2).train_batch(
                iter([micro_batch(0, k) for k in range(3)]))
        elif case == "layout":
            _engine(schedule="zb_v")
        elif case == "stages_key":
            _engine(extra={"pipeline": {"stages": 4}})
        elif case == "no_loss":
            from deepscale.pipe import PipeDataParallelTopology
            import deepscale
            model = PipelineModule(layer_specs(3), topology=PipeDataParallelTopology(2, 1))
            engine, _, _, _ = deepscale.initialize(model=model, config={
                "train_micro_batch_size_per_gpu": 3, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
            engine.train_batch(iter([micro_batch(0, 0)]))
    except (ValueError, TypeError) as err:
        return str(err)
    return None


@pytest.mark.parametrize("case, words", [
    ("too_few_layers", "every stage needs at least one layer"),
    ("empty_stage", "leaves stage 0 empty"),
    ("gas_not_multiple", "multiple of the 2 pipeline stages"),
    ("layout", "num_virtual_stages=2, virtual_placement='v'"),
    ("stages_key", "pipeline.stages=4"),
    ("no_loss", "loss_fn"),
])
def test_user_errors(case, words):
    results = run_distributed(_error_body, 2, args=(case,))
    messages = [r for r in results if r is not None]
    assert messages, f"{case}: no error raised"
    assert all(words in m for m in messages), messages


def _fp16_overflow_body():
    engine = _engine(extra={"fp16": {"enabled": True, "initial_scale_power": 4, "hysteresis": 1}})
    before = [p.detach().clone() for p in engine.module.parameters()]
    # An infinite input on stage 0 overflows stage 0's gradients only; every stage must skip.
    bad = iter([(torch.full((3, 8), float("inf")), torch.zeros(3, 4)) for _ in range(2)])
    engine.train_batch(bad)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    scale_after_skip = engine.loss_scale
    engine.train_batch(iter([micro_batch(0, k) for k in range(2)]))
    changed = not all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    return engine.skipped_steps, unchanged, scale_after_skip, changed


def test_fp16_overflow_decision_is_shared_by_all_stages():
    results = run_distributed(_fp16_overflow_body, 2)
    assert [r[0] for r in results] == [1, 1]
    assert all(r[1] for r in results) and all(r[3] for r in results)
    assert results[0][2] == results[1][2] < 16


def test_topology_classes():
    from deepscale.pipe import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert topo.get_axis_names() == ["pipe", "data", "model"]
    assert topo.get_rank(pipe=1, data=0, model=1) == 5
    assert topo.get_coord(6) == topo.ProcessCoord(pipe=1, data=1, model=0)
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.filter_match(pipe=0, model=1) == [1, 3]
    assert topo.parallel is not None and topo.parallel.degrees["tp"] == 2
    assert topo.parallel.coord(5) == {"pp": 1, "dp": 0, "ep": 0, "sp": 0, "tp": 1}
    assert topo.get_rank_repr(5) == "model_01"
    odd = ProcessTopology(axes=["data", "pipe"], dims=[2, 2])
    assert odd.parallel is None and odd.get_rank(data=1, pipe=0) == 2
    assert PipeDataParallelTopology(2, 3).world_size() == 6
    with pytest.raises(ValueError, match="one coordinate per axis"):
        topo.get_rank(pipe=0)


def test_partition_methods():
    from deepscale.runtime.pipe.partition import partition_balanced, partition_layers, partition_uniform
    assert partition_uniform(7, 3) == [0, 3, 5, 7]
    assert partition_balanced([1, 1, 1, 9, 1, 1], 2) == [0, 3, 6]
    names = ["Embed", "Block", "Block", "Block", "Block", "Head"]
    bounds = partition_layers("type:block", 2, 6, lambda: names, lambda: [0] * 6)
    assert bounds[1] in (3, 4) and sum(1 for n in names[:bounds[1]] if n == "Block") == 2
    assert partition_layers([0, 2, 6], 2, 6, lambda: names, lambda: [0] * 6) == [0, 2, 6]
    with pytest.raises(ValueError, match="not known"):
        partition_layers("best", 2, 6, lambda: names, lambda: [1] * 6)
