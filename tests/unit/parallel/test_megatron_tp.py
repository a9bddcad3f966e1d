"""A hand-built Megatron-style tensor-parallel GPT (column/row layers, vocab-parallel embedding and
cross-entropy, optional sequence parallelism) trained through ``deepscale.initialize`` with
``tensor_parallel.tp.tp_size``, against the dense example GPT on one process.

fp32; per-step losses, gradient norms and final weights within rtol 1e-5 (atol 1e-6) over 5 SGD
steps with clipping active.
"""
import pytest
import torch

from dist_harness import run_distributed

RTOL, ATOL = 1e-5, 1e-6
STEPS, LR, MOMENTUM, CLIP = 5, 0.1, 0.9, 0.5


def _body(tp, sequence_parallel, zero_stage):
    import copy
    import torch.distributed as dist
    import deepscale
    from deepscale.parallel import build_parallel_grid, reset_parallel_grid
    from deepscale.parallel.state_dict import full_state_dict
    from _tp_models import MegatronGPT, batches, build_example_gpt
    reset_parallel_grid()
    dp = dist.get_world_size() // tp
    grid = build_parallel_grid(tp=tp)
    dense = build_example_gpt(vocab_size=64)
    model = MegatronGPT(copy.deepcopy(dense), grid.get_model_parallel_group(), sequence_parallel)
    ref_opt = torch.optim.SGD(dense.parameters(), lr=LR, momentum=MOMENTUM)
    data = batches(STEPS, 2 * dp, 8, vocab=64)
    ref_losses, ref_norms = [], []
    for ids in data:
        loss = dense((ids, ids))
        ref_opt.zero_grad()
        loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(dense.parameters(), CLIP).item())
        ref_opt.step()
        ref_losses.append(loss.item())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": CLIP,
              "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": MOMENTUM}},
              "zero_optimization": {"stage": zero_stage}, "tensor_parallel": {"tp": {"tp_size": tp}}}
    engine, *_ = deepscale.initialize(model=model, config=config)
    dp_rank = grid.get_data_parallel_rank()
    losses, norms = [], []
    for ids in data:
        loss = engine((ids[2 * dp_rank:2 * dp_rank + 2], ids[2 * dp_rank:2 * dp_rank + 2]))
        engine.backward(loss)
        engine.step()
        norms.append(engine.get_global_grad_norm())
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=grid.get_data_parallel_group())
        losses.append(mean.item() / dp)
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL), (losses, ref_losses)
    assert torch.allclose(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL), (norms, ref_norms)
    final = full_state_dict(engine.module)
    mapping = {"emb.weight": "tok_emb.weight", "pos.weight": "pos_emb.weight", "ln_f.weight": "ln_f.weight",
               "ln_f.bias": "ln_f.bias"}
    for i in range(len(dense.blocks)):
        for mine, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2"), ("qkv", "attn.qkv"), ("proj", "attn.proj"),
                             ("fc", "mlp.fc"), ("mproj", "mlp.proj")):
            for p in ("weight", "bias"):
                mapping[f"blocks.{i}.{mine}.{p}"] = f"blocks.{i}.{theirs}.{p}"
    ref = dense.state_dict()
    for mine, theirs in mapping.items():
        assert torch.allclose(final[mine], ref[theirs], rtol=RTOL, atol=ATOL), \
            f"{mine}: max diff {(final[mine] - ref[theirs]).abs().max().item()}"
    engine.destroy()
    reset_parallel_grid()


@pytest.mark.parametrize("world, tp, sequence_parallel, zero_stage", [
    (2, 2, False, 0), (2, 2, True, 0), (4, 4, True, 0), (4, 2, True, 1)])
def test_megatron_style_tp_training_parity(world, tp, sequence_parallel, zero_stage):
    run_distributed(_body, world, args=(tp, sequence_parallel, zero_stage))
