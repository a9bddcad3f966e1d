"""Through the engine at ZeRO 0-3 on 2 gloo ranks, checkpointing changes nothing bitwise:
losses, global gradient norms and parameters equal those without checkpointing (fp32, fixed
seeds, dropout on; gradient accumulation too at stages 2 and 3) for reentrant and
non-reentrant checkpoints, with a frozen layer, a layer shared across the checkpoint boundary
and a first checkpoint whose input needs no grad."""
import pytest
import torch

from dist_harness import run_distributed

from _ckpt_models import batch, make_net

NUM_STEPS = 3
STAGE3_SMALL = {"stage3_param_persistence_threshold": 10, "stage3_prefetch_bucket_size": 200,
                "stage3_max_live_parameters": 2000, "reduce_bucket_size": 300}


def _config(stage: int, with_section: bool, gas: int = 1) -> dict:
    cfg = {"train_batch_size": 8 * gas, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas,
           "steps_per_print": 1000,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": stage, **(STAGE3_SMALL if stage == 3 else {})}}
    if stage in (1, 2):
        cfg["zero_optimization"]["reduce_bucket_size"] = 300  # several buckets
    if with_section:
        cfg["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False}
    return cfg


def _train(stage: int, mode, gas: int = 1):
    import torch.distributed as dist

    import deepscale
    import deepscale.zero
    model = make_net(mode)
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(),
                                           config=_config(stage, mode is not None, gas))
    rank, losses, norms = dist.get_rank(), [], []
    for step in range(NUM_STEPS):
        for micro in range(gas):
            x, y = batch(10 * step + micro, rank)
            torch.manual_seed(1000 * step + 10 * micro + rank)  # the same dropout masks in every mode
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    with deepscale.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return losses, norms, params


def _body(stage: int, gas: int = 1):
    import deepscale.checkpointing as ckpt
    results = {mode: _train(stage, mode, gas) for mode in (None, "reentrant", "reentrant_closure", "non_reentrant")}
    configured = ckpt.is_configured()
    ckpt.unconfigure()
    return results, configured


@pytest.mark.parametrize("stage,gas", [(0, 1), (1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_checkpointing_is_bitwise_neutral_through_the_engine(stage, gas):
    for results, configured in run_distributed(_body, 2, args=(stage, gas)):
        assert configured, "the engine did not configure deepscale.checkpointing from the config section"
        ref_losses, ref_norms, ref_params = results[None]
        frozen = ref_params["blocks.0.fc1.weight"]
        for mode in ("reentrant", "reentrant_closure", "non_reentrant"):
            losses, norms, params = results[mode]
            assert losses == ref_losses, (mode, losses, ref_losses)
            assert norms == ref_norms, (mode, norms, ref_norms)
            for name, want in ref_params.items():
                assert torch.equal(params[name], want), f"{mode} stage {stage}: {name} differs"
            assert torch.equal(params["blocks.0.fc1.weight"], frozen)
        # Training moved the trainable weights and not the frozen one.
        from _ckpt_models import make_net as fresh
        initial = dict(fresh(None).named_parameters())
        assert torch.equal(frozen, initial["blocks.0.fc1.weight"])
        assert not torch.equal(ref_params["shared.weight"], initial["shared.weight"])
