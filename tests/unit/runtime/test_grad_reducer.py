"""The gradient reducer: buckets launch during backward, in order, and average exactly."""
import torch

from dist_harness import run_distributed
from deepscale.runtime.grad_reducer import GradientReducer


def _launch_during_backward():
    import torch.distributed as dist
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    reducer = GradientReducer(list(model.parameters()), world_size=dist.get_world_size(), bucket_numel=72)
    launched_before_finalize = []
    original = reducer.finalize

    def spy():
        launched_before_finalize.append(reducer._next_to_launch)
        original()

    reducer.finalize = spy
    x = torch.randn(4, 8) * (dist.get_rank() + 1)
    reducer.begin_backward(sync=True)
    model(x).square().sum().backward()
    reducer.end_backward(sync=True)
    # Reference: all-reduce each parameter's local gradient by hand.
    torch.manual_seed(0)
    ref = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    ref(x).square().sum().backward()
    max_err = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        g = q.grad.clone()
        dist.all_reduce(g)
        g /= dist.get_world_size()
        max_err = max(max_err, (reducer.grad_view(p) - g).abs().max().item())
    return len(reducer.buckets), launched_before_finalize[0], max_err


def test_buckets_overlap_backward_and_average():
    for num_buckets, launched, max_err in run_distributed(_launch_during_backward, 2):
        assert num_buckets == 6
        # All but the buckets holding the last-produced gradients went out during backward.
        assert launched >= num_buckets - 1
        assert max_err < 1e-6


def test_unused_parameter_bucket_is_reduced_at_finalize():
    model = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    reducer = GradientReducer(list(model.parameters()), world_size=1, bucket_numel=1)
    reducer.begin_backward(sync=True)
    model[0](torch.ones(1, 4)).sum().backward()
    reducer.end_backward(sync=True)
    assert reducer.grad_view(model[1].weight).abs().sum() == 0
    assert reducer.grad_view(model[0].bias).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert model[0].weight.grad is reducer.grad_view(model[0].weight)  # fp32: a view into the flat buffer


def test_accumulates_in_fp32_for_bf16_params():
    layer = torch.nn.Linear(4, 1).to(torch.bfloat16)
    reducer = GradientReducer(list(layer.parameters()), world_size=1)
    assert reducer.buffer.dtype == torch.float32
    for _ in range(3):
        reducer.begin_backward(sync=False)
        layer(torch.full((1, 4), 1.0 / 3, dtype=torch.bfloat16)).sum().backward()
        reducer.end_backward(sync=False)
    assert abs(reducer.grad_view(layer.bias).item() - 3.0) < 1e-6
    assert layer.bias.grad is None  # moved into the fp32 buffer


def test_fp32_grads_are_bucket_views_accumulated_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    reducer = GradientReducer(list(model.parameters()), world_size=1, bucket_numel=8)
    x = torch.randn(5, 4)
    for _ in range(2):
        reducer.begin_backward(sync=False)
        model(x).sum().backward()
        reducer.end_backward(sync=False)
    storage = reducer.buffer.untyped_storage().data_ptr()
    for param in model.parameters():
        assert param.grad.untyped_storage().data_ptr() == storage
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref.load_state_dict(model.state_dict())
    for _ in range(2):
        ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def _foreign_backward_is_left_alone():
    """A backward outside begin/end_backward neither reduces nor moves gradients; the next own
    backward folds what the user left (PyTorch accumulation) and forgets what they cleared."""
    import torch.distributed as dist
    torch.manual_seed(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Linear(4, 2).to(dtype)
        reducer = GradientReducer(list(model.parameters()), world_size=world, bucket_numel=4)
        x = torch.full((1, 4), float(rank + 1), dtype=dtype)
        model(x).sum().backward()  # foreign: not reduced, stays in param.grad
        foreign_kept = model.bias.grad is not None and reducer.has_pending_grads is False
        model.zero_grad()  # the user clears it
        model(2 * x).sum().backward()  # foreign again, kept this time
        reducer.begin_backward(sync=True)
        model(x).sum().backward()
        reducer.end_backward(sync=True)
        # Per rank: 2x + x = 3x; averaged over ranks: 3 * mean(rank + 1).
        want = 3.0 * sum(r + 1 for r in range(world)) / world
        results[str(dtype)] = (foreign_kept, reducer.grad_view(model.weight)[0, 0].item(), want)
    return results


def test_foreign_backward_left_in_param_grad_then_folded():
    for per_rank in run_distributed(_foreign_backward_is_left_alone, 2):
        for dtype, (foreign_kept, got, want) in per_rank.items():
            assert foreign_kept, dtype
            assert got == want, f"{dtype}: {got} vs {want}"
