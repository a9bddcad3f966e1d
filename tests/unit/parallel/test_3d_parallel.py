"""3D parallelism: tensor x pipeline x data parallel (TP=2 x PP=2 x DP=2 on 8 gloo processes) with
ZeRO-1 and ZeRO-2 on the pipeline engine, against one process training the dense layers.

fp32; per-step losses, global gradient norms (clipping active) and final weights within rtol 1e-5
(atol 1e-6 for values near zero) over 5 SGD-with-momentum steps. The layer stack has tensor-parallel
weights (column/row-parallel linears) and replicated ones (layer norms, a dense head) on both
stages, so the global norm must count each shard once and each replicated weight once.
"""
import pytest
import torch

from dist_harness import run_distributed
from _3d_models import ATOL, CLIP, DP, PP, RTOL, STEPS, TP, reference_training


def _parity_body(zero_stage, use_mpu):
    import torch.distributed as dist
    import deepscale
    from _3d_models import MegatronStyleMpu, build_3d_engine, config, layer_specs, mse, rank_iterator
    from deepscale.parallel.state_dict import full_state_dict
    from deepscale.pipe import PipeModelDataParallelTopology, PipelineModule
    if use_mpu:  # an mpu whose layout disagrees with the module's topology is refused before any group is built
        wrong = MegatronStyleMpu(dist.get_rank(), swap_dp_tp=True)
        model = PipelineModule(layer_specs(wrong.get_model_parallel_group()), loss_fn=mse,
                               topology=PipeModelDataParallelTopology(num_pp=PP, num_mp=TP, num_dp=DP))
        if dist.get_rank() % (DP * TP) not in (0, DP * TP - 1):  # ranks whose coordinates differ
            with pytest.raises(ValueError, match="PipelineModule's topology"):
                deepscale.initialize(model=model, config=config(zero_stage, False), mpu=wrong)
    engine = build_3d_engine(zero_stage, use_mpu)
    assert engine.grid.get_model_parallel_world_size() == TP and engine.dp_world_size == DP
    losses, norms = [], []
    for step in range(STEPS):
        it = rank_iterator(step, engine.grid.data_parallel_id)
        losses.append(float(engine.train_batch(it if engine.is_first_stage() or engine.is_last_stage() else None)))
        norms.append(float(engine.get_global_grad_norm()))
    final = full_state_dict(engine.module)  # tensor-parallel shards gathered to whole weights
    return losses, norms, final


def _check_parity(results, reference=reference_training):
    ref_losses, ref_norms, ref_model = reference()
    assert max(ref_norms) > CLIP, "clipping must be active for the norm to matter"
    ref = ref_model.state_dict()
    seen = set()
    for losses, norms, final in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL, atol=ATOL)
        for name, value in final.items():
            assert value.shape == ref[name].shape, f"{name}: {tuple(value.shape)} is not the whole weight"
            torch.testing.assert_close(value, ref[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(ref), f"weights never compared: {set(ref) - seen}"


@pytest.mark.parametrize("zero_stage, use_mpu", [(1, False), (2, True)])
def test_tp2_pp2_dp2_parity(zero_stage, use_mpu):
    """ZeRO-1 with the grid built from the config and topology; ZeRO-2 with a user's Megatron-style mpu."""
    _check_parity(run_distributed(_parity_body, TP * PP * DP, args=(zero_stage, use_mpu)))


def _tied_body(zero_stage):
    import functools
    import deepscale
    import torch.distributed as dist
    from _3d_models import (DenseTiedLM, MegatronStyleMpu, config, lm_rank_iterator, tied_lm_specs,
                            vocab_parallel_loss)
    from deepscale.parallel import get_parallel_grid, reset_parallel_grid
    from deepscale.parallel.state_dict import full_state_dict, shard_state_dict
    from deepscale.pipe import PipeModelDataParallelTopology, PipelineModule
    reset_parallel_grid()
    # Tensor groups made by hand and no mpu given: initialize() builds the grid from the topology.
    group = MegatronStyleMpu(dist.get_rank()).get_model_parallel_group()
    model = PipelineModule(tied_lm_specs(group), topology=PipeModelDataParallelTopology(PP, TP, DP),
                           partition_method="uniform", loss_fn=None)
    embedding = model.tied_modules["embed"]
    model.loss_fn = functools.partial(vocab_parallel_loss, tp_group=group, vocab_start=embedding.vocab_start)
    local = model.state_dict()
    model.load_state_dict(shard_state_dict(model, {k: v for k, v in DenseTiedLM().state_dict().items()
                                                   if k in local}), strict=True)
    engine, *_ = deepscale.initialize(model=model, config=config(zero_stage, True))
    grid = get_parallel_grid()
    assert grid is not None and grid.topology.degrees == {"pp": PP, "dp": DP, "ep": 1, "sp": 1, "tp": TP}
    assert engine.grid.tp_group is grid.get_model_parallel_group()
    assert engine.grid.dp_group is grid.get_data_parallel_group()
    losses, norms = [], []
    for step in range(STEPS):
        it = lm_rank_iterator(step, engine.grid.data_parallel_id)
        losses.append(float(engine.train_batch(it if engine.is_first_stage() or engine.is_last_stage() else None)))
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms, full_state_dict(engine.module)


def test_tied_vocab_parallel_embedding_across_stages():
    """The embedding (sharded over the vocabulary) and the LM head share a weight across the two stages:
    its gradient is summed over the stages and the global norm counts each of its shards once. No
    grid is registered beforehand: initialize() builds it from the topology and the config."""
    from _3d_models import lm_reference_training
    _check_parity(run_distributed(_tied_body, TP * PP * DP, args=(1,)), lm_reference_training)


class _TensorOnlyMpu:
    """A Megatron mpu of a model that is not pipelined: tensor and data accessors only (2 ranks, TP=2)."""

    def __init__(self):
        import torch.distributed as dist
        self.tp = dist.new_group(ranks=[0, 1])
        self.dp = [dist.new_group(ranks=[r]) for r in range(2)][dist.get_rank()]

    def get_model_parallel_group(self):
        return self.tp

    def get_model_parallel_world_size(self):
        return 2

    def get_model_parallel_rank(self):
        import torch.distributed as dist
        return dist.get_rank()

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_world_size(self):
        return 1

    def get_data_parallel_rank(self):
        return 0


def _single_stage_body():
    import deepscale
    from _3d_models import GAS, config, dense_reference, layer_specs, mse, rank_iterator
    from deepscale.parallel.state_dict import full_state_dict, shard_state_dict
    from deepscale.pipe import PipeModelDataParallelTopology, PipelineModule
    mpu = _TensorOnlyMpu()
    model = PipelineModule(layer_specs(mpu.get_model_parallel_group()), loss_fn=mse,
                           topology=PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=1))
    model.load_state_dict(shard_state_dict(model, dense_reference().state_dict()), strict=True)
    cfg = {**config(2, False), "gradient_accumulation_steps": GAS * DP}  # the reference's batch on one replica
    engine, *_ = deepscale.initialize(model=model, config=cfg, mpu=mpu)
    losses, norms = [], []
    for step in range(STEPS):
        losses.append(float(engine.train_batch(rank_iterator(step, 0, gas=GAS * DP))))
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms, full_state_dict(engine.module)


def test_single_stage_megatron_mpu_without_pipeline_accessors():
    """TP=2 on one pipeline stage with ZeRO-2, the mpu having no pipeline accessors."""
    _check_parity(run_distributed(_single_stage_body, 2))
