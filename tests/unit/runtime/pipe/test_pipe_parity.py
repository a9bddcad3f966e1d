"""Pipeline training on gloo matches one process training the same layers (fp32: losses and
final weights within 1e-6 relative over the steps), for every schedule and layout."""
import pytest
import torch

from dist_harness import run_distributed
from pipe_models import layer_specs, mse, rank_iterator, reference_state, reference_training, xent

STEPS = 4
RTOL = 1e-6
ATOL = 1e-7  # values near zero: relative error is meaningless


def _train_body(pp, dp, schedule, gas, zero_stage, tied, passthrough, ckpt_interval, optimizer, clip, steps,
                bf16=False):
    import deepscale
    from deepscale.pipe import PipelineModule, PipeDataParallelTopology
    from pipe_models import layer_specs, mse, rank_iterator, xent
    v, placement = {"interleaved_1f1b": (2, "loop"), "zb_v": (2, "v")}.get(schedule, (1, "loop"))
    specs = layer_specs(2 * pp * v - 1 if not tied else 2 * pp * v - 2, passthrough=passthrough, tied=tied)
    model = PipelineModule(specs, topology=PipeDataParallelTopology(num_pp=pp, num_dp=dp),
                           loss_fn=xent if tied else mse, seed_layers=True, partition_method="uniform",
                           activation_checkpoint_interval=ckpt_interval, num_virtual_stages=v,
                           virtual_placement=placement)
    opt = {"type": "SGD", "params": {"lr": 0.1}} if optimizer == "sgd" else {"type": "Adam", "params": {"lr": 0.01}}
    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": gas, "optimizer": opt,
              "gradient_clipping": clip, "zero_optimization": {"stage": zero_stage},
              "pipeline": {"schedule": schedule}, "steps_per_print": 10**6, "bf16": {"enabled": bf16}}
    engine, _, _, _ = deepscale.initialize(model=model, config=config)
    losses = []
    for step in range(steps):
        it = rank_iterator(step, gas, engine.grid.data_parallel_id, dp, passthrough=passthrough, tied=tied)
        losses.append(float(engine.train_batch(it if engine.is_first_stage() or engine.is_last_stage() else None)))
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return losses, state, engine.is_first_stage(), engine.is_last_stage()


def _check(results, specs, gas, dp, loss_fn, optimizer="sgd", clip=0.0, steps=STEPS, **data_kw):
    lr = 0.1 if optimizer == "sgd" else 0.01
    ref_losses, modules = reference_training(specs, steps, gas, dp, loss_fn, lr=lr, optimizer=optimizer, clip=clip,
                                             **data_kw)
    ref = reference_state(specs, modules)
    seen = set()
    for losses, state, _, _ in results:
        torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(ref_losses, dtype=torch.float64),
                                   rtol=RTOL, atol=ATOL)
        for name, value in state.items():
            torch.testing.assert_close(value, ref[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(ref), f"parameters never compared: {set(ref) - seen}"


def _run(pp, dp, schedule="1f1b", gas=4, zero_stage=0, tied=False, passthrough=False, ckpt_interval=0,
         optimizer="sgd", clip=0.0, steps=STEPS):
    results = run_distributed(_train_body, pp * dp, args=(pp, dp, schedule, gas, zero_stage, tied, passthrough,
                                                          ckpt_interval, optimizer, clip, steps))
    v = 2 if schedule in ("interleaved_1f1b", "zb_v") else 1
    specs = layer_specs(2 * pp * v - 1 if not tied else 2 * pp * v - 2, passthrough=passthrough, tied=tied)
    _check(results, specs, gas, dp, xent if tied else mse, optimizer=optimizer, clip=clip, steps=steps,
           passthrough=passthrough, tied=tied)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "interleaved_1f1b", "zb_h1", "zb_v"])
def test_pp2_every_schedule(schedule):
    _run(2, 1, schedule)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "interleaved_1f1b", "zb_h1", "zb_v"])
def test_pp4(schedule):
    _run(4, 1, schedule)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "interleaved_1f1b", "zb_h1", "zb_v"])
def test_pp2_dp2(schedule):
    _run(2, 2, schedule)


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_pp2_dp2_zero(zero_stage):
    _run(2, 2, "1f1b", zero_stage=zero_stage, optimizer="adam")


def test_tied_layers_with_clipping():
    # The embedding and the LM head share a weight across stages; clipping uses the global norm
    # with the tied weight counted once.
    _run(2, 1, "1f1b", tied=True, clip=0.05)


def test_tied_layers_interleaved_dp2():
    _run(2, 2, "interleaved_1f1b", tied=True, gas=2)


def test_tuples_and_non_grad_tensors_cross_stages():
    _run(2, 1, "1f1b", passthrough=True)


def test_activation_checkpointing():
    _run(2, 1, "1f1b", ckpt_interval=1)


def test_single_stage_and_gas_below_stages():
    _run(1, 2, "1f1b", gas=2)
    _run(4, 1, "1f1b", gas=2)


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
def test_bf16(schedule):
    # bf16 model, fp32 masters and fp32 gradient accumulation: losses within bf16 resolution of fp32.
    results = run_distributed(_train_body, 2, args=(2, 1, schedule, 4, 0, False, False, 0, "sgd", 0.0, STEPS, True))
    ref_losses, modules = reference_training(layer_specs(3), STEPS, 4, 1, mse)
    ref = reference_state(layer_specs(3), modules)
    for losses, state, _, _ in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=2e-2)
        for name, value in state.items():
            torch.testing.assert_close(value, ref[name], rtol=2e-2, atol=1e-2)


def _view_body(schedule):
    import deepscale
    from deepscale.pipe import LayerSpec, PipelineModule
    from pipe_models import Block, Head, View, micro_batch, mse
    specs = [LayerSpec(Block), LayerSpec(Block), LayerSpec(View), LayerSpec(Block), LayerSpec(Head)]
    model = PipelineModule(specs, num_stages=2, loss_fn=mse, seed_layers=True, partition_method=[0, 3, 5])
    engine, _, _, _ = deepscale.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "pipeline": {"schedule": schedule}})
    return [float(engine.train_batch(iter([micro_batch(s, k) for k in range(2)]))) for s in range(3)]


def test_stage_output_that_is_a_view():
    # A stage boundary whose output is a view (torch's split backward detaches outputs in place).
    from deepscale.pipe import LayerSpec
    from pipe_models import Block, Head, View
    specs = [LayerSpec(Block), LayerSpec(Block), LayerSpec(View), LayerSpec(Block), LayerSpec(Head)]
    ref_losses, _ = reference_training(specs, 3, 2, 1, mse)
    for schedule in ("zb_h1", "1f1b"):
        for losses in run_distributed(_view_body, 2, args=(schedule,)):
            assert losses == pytest.approx(ref_losses, rel=1e-6)
