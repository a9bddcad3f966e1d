"""deepscale.checkpointing on one process: bitwise gradients with dropout, nesting, keyword and
non-tensor arguments, the no-grad-input pitfall, RNG tracker replay, selective checkpointing,
contiguous slots, configuration and misuse errors."""
import json

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import deepscale.checkpointing as ckpt

from _ckpt_models import Block, batch, make_net, spy_frames

MODES = ("reentrant", "non_reentrant")


@pytest.fixture(autouse=True)
def _fresh_settings():
    ckpt.unconfigure()
    yield
    ckpt.unconfigure()


def _call(mode):
    return ckpt.checkpoint if mode == "reentrant" else ckpt.non_reentrant_checkpoint


def _grads(model, x, y, seed=11):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
def test_gradients_bitwise_equal_with_dropout_frozen_and_shared(mode):
    x, y = batch(0, 0)
    loss_ref, ref = _grads(make_net(None), x, y)
    loss, got = _grads(make_net(mode), x, y)
    assert torch.equal(loss, loss_ref)
    assert set(got) == set(ref) and "blocks.0.fc1.weight" not in got and "shared.weight" in got
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("mode", MODES)
def test_parameters_get_gradients_when_no_input_requires_grad(mode):
    block = Block(8)
    x = torch.randn(2, 8)  # raw data: the classic reentrant pitfall
    torch.manual_seed(1)
    block(x).sum().backward()
    ref = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = _call(mode)(block, x)
    assert out.requires_grad
    out.sum().backward()
    for want, param in zip(ref, block.parameters()):
        assert param.grad is not None and torch.equal(param.grad, want)


def _nested_fn(x, pair, scale, extra=None, tag="t"):
    assert tag == "t" and isinstance(scale, float)
    a, b = pair
    out = torch.nn.functional.dropout(x * a + b, 0.3) * scale
    return {"out": out + extra["bias"], "count": 3, "none": None, "ids": torch.arange(3)}


@pytest.mark.parametrize("mode", MODES)
def test_nested_structures_kwargs_and_non_tensor_values(mode):
    def run(wrap):
        torch.manual_seed(5)
        x = torch.randn(3, 4, requires_grad=True)
        a = torch.randn(4, requires_grad=True)
        b = torch.randn(4)
        bias = torch.randn(4, requires_grad=True)
        torch.manual_seed(9)
        result = wrap(_nested_fn, x, (a, b), 2.0, extra={"bias": bias}, tag="t")
        assert result["count"] == 3 and result["none"] is None and torch.equal(result["ids"], torch.arange(3))
        result["out"].pow(2).sum().backward()
        return [t.grad for t in (x, a, bias)]

    ref = run(lambda fn, *args, **kwargs: fn(*args, **kwargs))
    got = run(_call(mode))
    for want, have in zip(ref, got):
        assert torch.equal(have, want)


@pytest.mark.parametrize("use_grad", [False, True])
def test_nested_checkpoints(use_grad):
    inner = Block(8)
    outer_lin = torch.nn.Linear(8, 8)
    # A reentrant checkpoint cannot run under torch.autograd.grad, so that case nests only
    # non-reentrant ones.
    first = ckpt.non_reentrant_checkpoint if use_grad else ckpt.checkpoint

    def outer(x):
        return outer_lin(ckpt.non_reentrant_checkpoint(inner, first(inner, x)))

    def grads(loss, x):
        wanted = [x, inner.fc1.weight, outer_lin.weight]
        if use_grad:
            return torch.autograd.grad(loss, wanted)
        for t in wanted:
            t.grad = None
        loss.backward()
        return [t.grad for t in wanted]

    x = torch.randn(2, 8, requires_grad=True)
    torch.manual_seed(2)
    ref = grads(outer(x).sum(), x)
    torch.manual_seed(2)
    got = grads(ckpt.non_reentrant_checkpoint(outer, x).sum(), x)
    for want, have in zip(ref, got):
        assert torch.equal(have, want)


def test_reentrant_under_autograd_grad():
    block = Block(8)
    x = torch.randn(2, 8, requires_grad=True)
    torch.manual_seed(3)
    ref = torch.autograd.grad(block(x).sum(), [x, block.fc2.weight])
    torch.manual_seed(3)
    got = torch.autograd.grad(ckpt.checkpoint(block, x).sum(), [x, block.fc2.weight])
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert block.fc2.weight.grad is None, "autograd.grad must not accumulate into .grad"
    # A closure over a module works the same; one over a bare parameter cannot hand its
    # gradient to autograd.grad: a clear error.
    torch.manual_seed(3)
    got = torch.autograd.grad(ckpt.checkpoint(lambda t: block(t), x).sum(), [x, block.fc2.weight])
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    weight = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(RuntimeError, match="non_reentrant_checkpoint"):
        torch.autograd.grad(ckpt.checkpoint(lambda t: t @ weight, x).sum(), [x])


def test_non_deterministic_control_flow_is_reported():
    calls = []

    def fn(x):
        calls.append(1)
        return x.exp() if len(calls) == 1 else x * 2

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="same path"):
        ckpt.non_reentrant_checkpoint(fn, x).sum().backward()


def test_no_grad_mode_just_calls_the_function():
    block = Block(4)
    with torch.no_grad():
        out = ckpt.checkpoint(block, torch.randn(2, 4))
    assert not out.requires_grad


@pytest.mark.parametrize("mode", MODES)
def test_model_parallel_rng_tracker_is_replayed(mode):
    ckpt.model_parallel_cuda_manual_seed(123)
    tracker = ckpt.get_cuda_rng_tracker()

    def fn(x):
        with tracker.fork():
            x = torch.nn.functional.dropout(x, 0.5)
        return torch.nn.functional.dropout(x, 0.5) * 3

    def grad_of(wrap):
        ckpt.model_parallel_cuda_manual_seed(123)
        x = torch.ones(64, requires_grad=True)
        wrap(fn, x).sum().backward()
        return x.grad

    ref = grad_of(lambda fn, x: fn(x))
    assert torch.equal(grad_of(_call(mode)), ref)
    before = torch.get_rng_state()
    with tracker.fork():
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must leave the default stream alone"


def test_rng_tracker_errors():
    tracker = ckpt.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="seed 1"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="model_parallel_cuda_manual_seed"):
        with tracker.fork("missing"):
            pass


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.count = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_matmuls_and_recomputes_the_rest():
    x, y = batch(1, 0)

    def backward_matmuls(context_fn):
        model = make_net(None, frozen=False)
        torch.manual_seed(4)
        h = x
        for block in model.blocks:
            h = ckpt.non_reentrant_checkpoint(block, h, context_fn=context_fn)
        loss = torch.nn.functional.mse_loss(model.head(model.shared(h)).squeeze(-1), y)
        with _CountOps(set(ckpt.MATMUL_OPS)) as counter:
            loss.backward()
        return counter.count, {n: p.grad for n, p in model.named_parameters()}

    full_count, full = backward_matmuls(None)
    sel_count, sel = backward_matmuls(ckpt.selective_checkpoint_context())
    # 3 blocks x (fc1, fc2) + 1 shared inside block 1 = 7 forward matmuls are not recomputed.
    assert full_count - sel_count == 7
    for name in full:
        assert torch.equal(sel[name], full[name]), name


def test_selective_policy_function_and_bad_policy():
    seen = []

    def policy(ctx, op, *args, **kwargs):
        seen.append(op)
        return CheckpointPolicy.PREFER_RECOMPUTE

    x = torch.randn(3, 3, requires_grad=True)
    ckpt.non_reentrant_checkpoint(torch.sin, x, context_fn=ckpt.selective_checkpoint_context(policy)).sum().backward()
    assert torch.equal(x.grad, torch.cos(x.detach())) and torch.ops.aten.sin.default in seen
    with pytest.raises(TypeError, match="policy"):
        ckpt.selective_checkpoint_context(3)


@pytest.mark.parametrize("mode", MODES)
def test_contiguous_slots_and_cpu_checkpointing_keep_gradients(mode):
    x, y = batch(2, 0)
    _, ref = _grads(make_net(None), x, y)
    ckpt.configure(None, contiguous_checkpointing=True, num_checkpoints=3, checkpoint_in_cpu=True)
    for _ in range(2):  # the second run reuses the slots
        _, got = _grads(make_net(mode), x, y)
        for name in ref:
            assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("inner", MODES)
def test_contiguous_slots_with_checkpoints_nested_in_a_recomputation(inner):
    blocks = torch.nn.ModuleList([Block(8) for _ in range(2)])

    def pair(x, block):
        return _call(inner)(block, block(x))

    def run():
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        torch.manual_seed(4)
        h = x
        for block in blocks:
            h = ckpt.non_reentrant_checkpoint(pair, h, block)
        h.sum().backward()
        return x.grad

    ref = run()
    # One row per forward-level call (2 outer + 2 inner); the inner calls re-made during the
    # recomputations must not take rows.
    ckpt.configure(None, contiguous_checkpointing=True, num_checkpoints=4)
    assert torch.equal(run(), ref)


def test_contiguous_slots_overwritten_before_backward_raise():
    ckpt.configure(None, contiguous_checkpointing=True, num_checkpoints=2)
    x, y = batch(2, 0)
    with pytest.raises(RuntimeError, match="number_checkpoints=2"):
        make_net("non_reentrant")(x, y).backward()  # 3 checkpoints per forward, 2 slots


def test_configure_reads_the_section_and_arguments_override(tmp_path):
    section = {"partition_activations": True, "contiguous_memory_optimization": True, "number_checkpoints": 4,
               "cpu_checkpointing": True, "synchronize_checkpoint_boundary": True, "profile": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 1, "activation_checkpointing": section}))
    assert not ckpt.is_configured()
    ckpt.configure(None, deepspeed_config=str(path), checkpoint_in_cpu=False)
    current = ckpt.settings()
    assert ckpt.is_configured() and current.partition_activations and current.contiguous_checkpointing
    assert current.num_checkpoints == 4 and current.synchronize and current.profile
    assert current.checkpoint_in_cpu is False  # the argument wins
    ckpt.configure(None, deepspeed_config={"activation_checkpointing": {"profile": False}})
    assert ckpt.settings().profile is False and ckpt.settings().num_checkpoints is None


def test_configure_errors():
    with pytest.raises(ValueError, match="number_checkpoints"):
        ckpt.configure(None, contiguous_checkpointing=True)
    with pytest.raises(TypeError, match="deepspeed_config"):
        ckpt.configure(None, deepspeed_config=42)


def test_profile_and_synchronize(monkeypatch):
    from deepscale.accelerator import get_accelerator
    syncs = []
    monkeypatch.setattr(type(get_accelerator()), "synchronize", lambda self, device_index=None: syncs.append(1))
    ckpt.configure(None, profile=True, synchronize=True)
    x, y = batch(0, 0)
    make_net("non_reentrant")(x, y).backward()
    prof = ckpt.get_profile()
    assert prof["calls"] == 3 and prof["recomputes"] == 3 and prof["forward_s"] > 0 and prof["recompute_s"] > 0
    assert len(syncs) == 12  # entry and exit of 3 forwards and 3 recomputations
    ckpt.reset()
    assert ckpt.get_profile()["calls"] == 0


def test_engine_config_section_is_accepted_without_warnings():
    from deepscale.config import DeepScaleConfig
    cfg = DeepScaleConfig.from_dict({"train_batch_size": 2, "activation_checkpointing": {
        "partition_activations": True, "cpu_checkpointing": True, "profile": True}})
    assert not any(k.startswith("activation_checkpointing") for k in cfg.ignored_keys)
    ckpt.configure(None, deepspeed_config=cfg)
    assert ckpt.settings().partition_activations and ckpt.settings().checkpoint_in_cpu


def test_partition_without_model_parallelism_is_a_noop():
    class _MPU:
        def get_model_parallel_world_size(self):
            return 1

    ckpt.configure(_MPU(), partition_activations=True)
    with spy_frames() as frames:
        x, y = batch(0, 0)
        _, ref = _grads(make_net(None), x, y)
        _, got = _grads(make_net("non_reentrant"), x, y)
    assert all(not s.partitioned for f in frames for s in f.inputs.saved)
    for name in ref:
        assert torch.equal(got[name], ref[name])


def test_model_parallel_seed_differs_per_model_parallel_rank_only():
    class _MPU:
        def __init__(self, rank):
            self.rank = rank

        def get_model_parallel_rank(self):
            return self.rank

        def get_model_parallel_world_size(self):
            return 2

    draws = []
    for rank in (0, 1):
        ckpt.configure(_MPU(rank))
        ckpt.model_parallel_cuda_manual_seed(42)
        with ckpt.get_cuda_rng_tracker().fork():
            inside = torch.rand(4)
        draws.append((inside, torch.rand(4)))
    assert not torch.equal(draws[0][0], draws[1][0]), "model-parallel streams must differ across ranks"
    assert torch.equal(draws[0][1], draws[1][1]), "the default stream must be the same on every rank"
    torch.manual_seed(42)
    assert torch.equal(draws[0][1], torch.rand(4))
