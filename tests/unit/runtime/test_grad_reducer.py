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
    model(x).square().sum().backward()
    reducer.finalize()
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
    model[0](torch.ones(1, 4)).sum().backward()
    reducer.finalize()
    assert reducer.grad_view(model[1].weight).abs().sum() == 0
    assert reducer.grad_view(model[0].bias).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert model[0].weight.grad is None  # moved into the flat buffer


def test_accumulates_in_fp32_for_bf16_params():
    layer = torch.nn.Linear(4, 1).to(torch.bfloat16)
    reducer = GradientReducer(list(layer.parameters()), world_size=1)
    assert reducer.buffer.dtype == torch.float32
    for _ in range(3):
        layer(torch.full((1, 4), 1.0 / 3, dtype=torch.bfloat16)).sum().backward()
    assert abs(reducer.grad_view(layer.bias).item() - 3.0) < 1e-6
