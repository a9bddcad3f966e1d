"""AutoTP on unmodified models: logits at TP=N match TP=1 before training, then training parity.

fp32 throughout. Tolerances: logits 1e-5 relative (atol 1e-6); per-step losses and final weights
after 5 SGD (momentum) steps 1e-5 relative (atol 1e-6). The reference is the dense model trained by plain
PyTorch on the same rank; the TP model trains through ``deepscale.initialize`` with
``tensor_parallel.autotp_size``.
"""
import pytest
import torch

from dist_harness import run_distributed

pytest.importorskip("transformers", reason="AutoTP tests build Hugging Face models (the 'hf' test extra)")

RTOL, ATOL = 1e-5, 1e-6
# SGD, not Adam: Adam's first steps are lr * sign(grad), so an element whose gradient is ~1e-9
# flips with the rounding of the all-reduce; SGD moves weights in proportion to the gradients.
STEPS, LR, MOMENTUM = 5, 0.1, 0.9
CLIP = 0.5  # below the first steps' norms, so the tensor-parallel global norm decides the update


def _config(tp, zero_stage=0, extra=None):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": MOMENTUM}},
           "gradient_clipping": CLIP, "zero_optimization": {"stage": zero_stage},
           "tensor_parallel": {"autotp_size": tp}}
    cfg.update(extra or {})
    return cfg


def _hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _gpt_loss(model, ids):
    return model((ids, ids))


def _train_parity(build, loss_fn, tp, zero_stage=0, dp_batches=False):
    import copy
    import torch.distributed as dist
    import deepscale
    from deepscale.parallel import get_parallel_grid, reset_parallel_grid
    from deepscale.parallel.state_dict import full_state_dict
    from _tp_models import batches
    reset_parallel_grid()
    world = dist.get_world_size()
    dp = world // tp
    dense = build()
    model = copy.deepcopy(dense)
    ref_opt = torch.optim.SGD(dense.parameters(), lr=LR, momentum=MOMENTUM)
    data = batches(STEPS, 2 * dp, 8)
    # Reference: the whole global batch on one process.
    ref_losses, ref_norms, norms = [], [], []
    for ids in data:
        loss = loss_fn(dense, ids)
        ref_opt.zero_grad()
        loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(dense.parameters(), CLIP).item())
        ref_opt.step()
        ref_losses.append(loss.item())
    engine, *_ = deepscale.initialize(model=model, config=_config(tp, zero_stage))
    grid = get_parallel_grid()
    assert grid.get_model_parallel_world_size() == tp and engine.dp_world_size == dp
    dp_rank = grid.get_data_parallel_rank()
    losses = []
    for ids in data:
        local = ids[2 * dp_rank:2 * dp_rank + 2]
        loss = loss_fn(engine, local)
        engine.backward(loss)
        engine.step()
        norms.append(engine.get_global_grad_norm())
        mean = loss.detach().clone()
        if dp > 1:
            dist.all_reduce(mean, group=grid.get_data_parallel_group())
        losses.append(mean.item() / dp)
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL), (losses, ref_losses)
    assert torch.allclose(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL), (norms, ref_norms)
    assert max(ref_norms) > CLIP  # clipping was active
    final = full_state_dict(engine.module)
    for key, value in dense.state_dict().items():
        assert torch.allclose(final[key], value, rtol=RTOL, atol=ATOL), \
            f"{key}: max diff {(final[key] - value).abs().max().item()}"
    sharded = sum(p.numel() for p in engine.module.parameters() if getattr(p, "tensor_model_parallel", False))
    engine.destroy()
    reset_parallel_grid()
    return sharded


def _logits_body(name):
    import copy
    import torch.distributed as dist
    from deepscale.parallel import apply_autotp
    from _tp_models import batches, build_hf
    dense = build_hf(name)
    model = copy.deepcopy(dense)
    report = apply_autotp(model)
    ids = batches(1, 2, 8)[0]
    with torch.no_grad():
        ref, out = dense(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(out, ref, rtol=RTOL, atol=ATOL), f"max diff {(out - ref).abs().max().item()}"
    assert report.column and report.row and report.vocab
    dense_bytes = sum(p.numel() for n, p in dense.named_parameters() if "proj" in n or "attn" in n)
    return dist.get_rank(), len(report.column), len(report.replicated_heads), dense_bytes


HF_NAMES = ["llama_gqa", "llama_mqa", "llama_uneven_heads", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi",
            "opt"]


@pytest.mark.parametrize("name", HF_NAMES)
def test_autotp_logits_match_dense(name):
    results = run_distributed(_logits_body, 2, args=(name,))
    if name == "llama_mqa":  # one key/value head, two ranks: each keeps a replica
        assert all(r[2] > 0 for r in results)


def _hf_train_body(name, tp, zero_stage):
    from _tp_models import build_hf
    return _train_parity(lambda: build_hf(name), _hf_loss, tp, zero_stage)


@pytest.mark.parametrize("name", HF_NAMES)
def test_autotp_training_parity_tp2(name):
    run_distributed(_hf_train_body, 2, args=(name, 2, 0))


def _gpt_train_body(tp, zero_stage):
    from _tp_models import build_example_gpt
    return _train_parity(build_example_gpt, _gpt_loss, tp, zero_stage)


@pytest.mark.parametrize("world, tp, zero_stage", [(2, 2, 0), (4, 4, 0), (4, 2, 1), (4, 2, 2)])
def test_example_gpt_training_parity(world, tp, zero_stage):
    run_distributed(_gpt_train_body, world, args=(tp, zero_stage))


def _memory_body():
    from deepscale.parallel import apply_autotp
    from _tp_models import build_example_gpt
    model = build_example_gpt(vocab_size=64)
    dense = {n: p.numel() for n, p in model.named_parameters()}
    apply_autotp(model)
    local = {n: p.numel() for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    return sum(local.values()), sum(dense[n] for n in local)


def test_sharded_layer_parameters_halve_at_tp2():
    for local, dense in run_distributed(_memory_body, 2):
        assert local * 2 == dense  # measured on the model's own parameters
