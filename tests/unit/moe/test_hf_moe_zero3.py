"""Tiny Mixtral and Qwen2-MoE models (random weights, from transformers configs) under ZeRO-3 on
2 gloo ranks, without leaf-module lists, against a single process (fp32, 1e-5 relative).

In the transformers versions this was written against (5.x) a sparse MoE block keeps its experts
as fused 3-D parameters of one module that runs on every forward, so ZeRO-3 gathers them on every
rank whatever the routing; the test also routes all of one rank's tokens to a single expert to
show no rank waits on another."""
import pytest
import torch

from dist_harness import run_distributed

pytest.importorskip("transformers")

WORLD, STEPS, BS, SEQ = 2, 3, 2, 8


def _model(kind):
    import transformers
    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                             moe_intermediate_size=24, shared_expert_intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             num_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
                                             decoder_sparse_step=1, mlp_only_layers=[])
        model = transformers.Qwen2MoeForCausalLM(config)
    return model.float()


def _batch(step, rank, skew):
    gen = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, 64, (BS, SEQ), generator=gen)
    if skew and rank == 1:
        ids = torch.full((BS, SEQ), 7)  # one token repeated: the router sends it to the same experts
    return ids


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _reference(kind, skew, world=WORLD):
    model = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(STEPS):
        per_rank = [_loss(model, _batch(step, r, skew)) for r in range(world)]
        opt.zero_grad()
        (sum(per_rank) / world).backward()
        opt.step()
        losses.append([v.item() for v in per_rank])
    return losses


def _body(kind, skew, ep_size=None, stage=3):
    import torch.distributed as dist
    import deepscale
    ref = _reference(kind, skew, dist.get_world_size())
    model = _model(kind)
    if ep_size is not None:
        from deepscale.comm.expert_groups import clear_expert_groups
        from deepscale.moe.hf import convert_hf_moe_experts
        clear_expert_groups()
        assert convert_hf_moe_experts(model, ep_size=ep_size) == 2  # one per layer
    config = {"train_micro_batch_size_per_gpu": BS, "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
              "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=config)
    rank = dist.get_rank()
    errors = []
    for step in range(STEPS):
        loss = _loss(engine, _batch(step, rank, skew))
        engine.backward(loss)
        engine.step()
        errors.append(abs(loss.item() - ref[step][rank]) / abs(ref[step][rank]))
    engine.destroy()
    return max(errors)


@pytest.mark.parametrize("skew", [False, True], ids=["random", "one-expert-rank"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_hf_moe_model_under_zero3_matches_single_process(kind, skew):
    errors = run_distributed(_body, WORLD, args=(kind, skew), timeout=180)
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("kind, stage", [("mixtral", 2), ("qwen2_moe", 3)])
def test_converted_hf_experts_with_expert_parallelism_match_single_process(kind, stage):
    """convert_hf_moe_experts: the same model with its experts split over EP=2 of 4 ranks."""
    errors = run_distributed(_body, 4, args=(kind, True, 2, stage), timeout=240)
    assert max(errors) < 1e-5, errors


def test_convert_refuses_a_model_without_fused_experts():
    from deepscale.moe.hf import convert_hf_moe_experts
    with pytest.raises(ValueError, match="no fused experts"):
        convert_hf_moe_experts(torch.nn.Linear(2, 2))
