"""Pipeline checkpoints are per layer: saved at PP=2 they load at PP=1, PP=4 and into a plain engine
over the same layers with the same next-step losses (weights and Adam state restored)."""
import pytest
import torch

from dist_harness import run_distributed

GAS = 2
NUM_BLOCKS = 7  # 8 layers: 2 per stage at PP=4


def _config(zero_stage=0, gas=GAS):
    return {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": gas,
            "optimizer": {"type": "Adam", "params": {"lr": 0.01}}, "steps_per_print": 10**6,
            "zero_optimization": {"stage": zero_stage}}


def _pipe_engine(pp, dp, zero_stage=0, gas=GAS):
    import deepscale
    from deepscale.pipe import PipelineModule, PipeDataParallelTopology
    from pipe_models import layer_specs, mse
    model = PipelineModule(layer_specs(NUM_BLOCKS), topology=PipeDataParallelTopology(pp, dp), loss_fn=mse,
                           seed_layers=True, base_seed=99 if pp != 2 else 1234, partition_method="uniform")
    engine, _, _, _ = deepscale.initialize(model=model, config=_config(zero_stage, gas))
    return engine


def _batch(engine, step, dp):
    from pipe_models import rank_iterator
    return rank_iterator(step, engine.gradient_accumulation_steps(), engine.grid.data_parallel_id, dp)


def _save_body(path, dp, zero_stage):
    engine = _pipe_engine(2, dp, zero_stage)
    for step in range(2):
        engine.train_batch(_batch(engine, step, dp))
    engine.save_checkpoint(path, client_state={"note": "hi"})
    saved = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    losses = [float(engine.train_batch(_batch(engine, step, dp))) for step in (2, 3)]
    return losses, saved


def _load_body(path, pp, dp, zero_stage, gas=GAS):
    engine = _pipe_engine(pp, dp, zero_stage, gas)  # other seeds: the weights must come from the checkpoint
    load_path, client = engine.load_checkpoint(path)
    assert load_path is not None and client == {"note": "hi"} and engine.global_steps == 2
    return [float(engine.train_batch(_batch(engine, step, dp))) for step in (2, 3)]


def _plain_body(path):
    import deepscale
    from pipe_models import build_reference, layer_specs, micro_batch, mse
    _, modules = build_reference(layer_specs(NUM_BLOCKS), base_seed=7)
    model = torch.nn.Sequential(*modules)
    engine, _, _, _ = deepscale.initialize(model=model, config=_config())
    engine.load_checkpoint(path)
    losses = []
    for step in (2, 3):
        total = 0.0
        for k in range(GAS):
            x, y = micro_batch(step, k)
            loss = mse(engine(x), y)
            engine.backward(loss)
            engine.step()
            total += float(loss) / GAS
        losses.append(total)
    return losses


@pytest.mark.parametrize("pp, world", [(1, 1), (4, 4)])
def test_pp2_checkpoint_loads_at_another_degree(tmp_path, pp, world):
    saved = run_distributed(_save_body, 2, args=(str(tmp_path), 1, 0))
    expected = saved[0][0]
    loaded = run_distributed(_load_body, world, args=(str(tmp_path), pp, 1, 0))
    for losses in loaded:
        assert losses == pytest.approx(expected, rel=1e-6)
    # zero_to_fp32 consolidates the per-layer files and every stage's optimizer shard.
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    whole = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    merged = {**saved[0][1], **saved[1][1]}
    assert set(whole) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(whole[name], value, rtol=0, atol=0)


def test_pipeline_checkpoint_loads_into_plain_engine(tmp_path):
    saved = run_distributed(_save_body, 2, args=(str(tmp_path), 1, 0))
    plain = run_distributed(_plain_body, 1, args=(str(tmp_path),))
    assert plain[0] == pytest.approx(saved[0][0], rel=1e-6)


def test_zero2_dp2_checkpoint_loads_at_pp4(tmp_path):
    saved = run_distributed(_save_body, 4, args=(str(tmp_path), 2, 2))
    # The 2 replicas read micro-batches {0, 2} and {1, 3}; one replica with 4 micro-batches reads the same.
    loaded = run_distributed(_load_body, 4, args=(str(tmp_path), 4, 1, 0, 2 * GAS))
    for losses in loaded:
        assert losses == pytest.approx(saved[0][0], rel=1e-6)
