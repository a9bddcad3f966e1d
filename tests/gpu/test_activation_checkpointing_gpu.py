"""Activation checkpointing on one CUDA device: the CUDA RNG state is replayed (dropout grads
bitwise equal to no checkpointing) and ``checkpoint_in_cpu`` keeps saved inputs in host memory,
lowering device memory held between forward and backward. Skipped without CUDA."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit",
                                "activation_checkpointing"))
from _ckpt_models import Block, spy_frames  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_accelerator(monkeypatch):
    monkeypatch.setenv("DEEPSCALE_ACCELERATOR", "cuda")
    import deepscale.checkpointing as ckpt
    ckpt.unconfigure()
    yield ckpt
    ckpt.unconfigure()


def _run(ckpt, mode, in_cpu):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block(256) for _ in range(8)]).cuda()
    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    ckpt.configure(None, checkpoint_in_cpu=in_cpu)
    torch.manual_seed(1)
    with spy_frames() as calls:
        h = x
        for block in blocks:
            h = block(h) if mode is None else getattr(ckpt, mode)(block, h)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        h.sum().backward()
    devices = {s.data.device.type for c in calls for s in c.inputs.saved}
    return [p.grad for p in blocks.parameters()] + [x.grad], held, devices


@pytest.mark.parametrize("mode", ["checkpoint", "non_reentrant_checkpoint"])
def test_cuda_dropout_replay_and_cpu_checkpointing(_cuda_accelerator, mode):
    ckpt = _cuda_accelerator
    ref, held_plain, _ = _run(ckpt, None, False)
    got, held_gpu, devices_gpu = _run(ckpt, mode, False)
    got_cpu, held_cpu, devices_cpu = _run(ckpt, mode, True)
    for want, a, b in zip(ref, got, got_cpu):
        assert torch.equal(a, want) and torch.equal(b, want)
    assert devices_gpu == {"cuda"} and devices_cpu == {"cpu"}
    assert held_cpu < held_gpu < held_plain
