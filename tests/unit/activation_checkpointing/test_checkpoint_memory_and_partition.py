"""Saved-activation memory of a 12-layer model, counted with saved-tensor hooks, and
partitioned saved inputs across a model-parallel group of 2 gloo ranks."""
import torch

import deepscale.checkpointing as ckpt
from deepscale.runtime.activation_checkpointing import non_reentrant as nr_module
from dist_harness import run_distributed

from _ckpt_models import Block, spy_frames

LAYERS, DIM, BATCH = 12, 64, 32


def _storage_bytes(tensors, exclude):
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen or key in exclude:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def test_saved_activations_fall_to_one_layer_plus_the_layer_inputs():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block(DIM) for _ in range(LAYERS)])
    params = {p.untyped_storage().data_ptr() for p in blocks.parameters()}
    x = torch.randn(BATCH, DIM, requires_grad=True)

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        h = x
        for block in blocks:
            h = block(h)
    plain_bytes = _storage_bytes(packed, params)
    per_layer = plain_bytes / LAYERS

    frames, peak = [], [0]
    orig_init, orig_unpack = nr_module._Frame.__init__, nr_module._Frame.unpack

    def spy_init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        frames.append(self)

    def spy_unpack(self, index):
        value = orig_unpack(self, index)
        live = [t for f in frames for t in f.recomputed.values()] + [value]
        peak[0] = max(peak[0], _storage_bytes(live, params))
        return value

    nr_module._Frame.__init__, nr_module._Frame.unpack = spy_init, spy_unpack
    try:
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            h = x
            for block in blocks:
                h = ckpt.non_reentrant_checkpoint(block, h)
        kept_inside = len(packed)
        inputs_bytes = _storage_bytes([s.data for f in frames for s in f.inputs.saved], params)
        h.sum().backward()
    finally:
        nr_module._Frame.__init__, nr_module._Frame.unpack = orig_init, orig_unpack
    assert kept_inside == 0, "nothing inside a checkpoint may be saved by the forward"
    assert inputs_bytes == LAYERS * BATCH * DIM * 4
    assert 0 < peak[0] <= per_layer, (peak[0], per_layer)
    # The criterion: at most one layer's activations plus the layer inputs, against all 12 layers.
    assert peak[0] + inputs_bytes <= per_layer + inputs_bytes < plain_bytes / 3
    print(f"saved bytes: plain {plain_bytes}, checkpointed inputs {inputs_bytes} + peak recomputed {peak[0]} "
          f"(one layer: {per_layer:.0f})")


class _WorldMPU:
    """A model-parallel unit whose model-parallel group is the whole world."""

    def get_model_parallel_group(self):
        import torch.distributed as dist
        return dist.group.WORLD

    def get_model_parallel_world_size(self):
        import torch.distributed as dist
        return dist.get_world_size()

    def get_model_parallel_rank(self):
        import torch.distributed as dist
        return dist.get_rank()


def _partition_body(mode: str, in_cpu: bool):
    import torch.distributed as dist
    from _ckpt_models import batch, make_net
    ckpt.unconfigure()
    x, y = batch(0, 0)  # the same input on both ranks, as after a tensor-parallel all-reduce

    def grads(model):
        torch.manual_seed(7)
        model(x, y).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(make_net(None))
    ckpt.configure(_WorldMPU(), partition_activations=True, checkpoint_in_cpu=in_cpu)
    try:
        with spy_frames() as frames:
            got = grads(make_net(mode))
    finally:
        ckpt.unconfigure()
    equal = all(torch.equal(got[n], ref[n]) for n in ref) and set(got) == set(ref)
    pieces = [s.data.numel() for f in frames for s in f.inputs.saved]
    return equal, pieces, x.numel(), dist.get_rank()


def test_partition_activations_split_and_gather_across_two_ranks():
    for mode, in_cpu in (("non_reentrant", False), ("reentrant", True)):
        for equal, pieces, full, rank in run_distributed(_partition_body, 2, args=(mode, in_cpu)):
            assert equal, f"{mode} rank {rank}: gradients differ with partitioned inputs"
            assert len(pieces) == 3 and all(n == full // 2 for n in pieces), (mode, pieces)
