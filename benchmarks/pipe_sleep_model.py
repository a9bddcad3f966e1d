"""Layers whose compute is a fixed sleep, for measuring pipeline schedules on a busy CPU machine.

A sleeping rank uses no CPU, so 4-8 ranks on 2 cores measure the schedule's own makespan. Each
:class:`SleepLayer` sleeps ``forward_s`` in forward, ``input_s`` when the gradient of its input is
computed and ``weight_s`` when the gradient of its weight is (two separate autograd nodes, so a
split backward runs them in its I and W halves). Imports only torch: DeepSpeed runs it too.
"""
import time

import torch


#: Seconds this process actually slept in sleep layers (a loaded machine oversleeps; the benchmark
#: counts that as compute, not as bubble).
SLEPT = [0.0]


def _sleep(seconds: float) -> None:
    if seconds > 0:
        start = time.perf_counter()
        time.sleep(seconds)
        SLEPT[0] += time.perf_counter() - start


class _Sleep(torch.autograd.Function):
    """Identity on ``x``; sleeps ``forward_s`` forward and ``backward_s`` backward."""

    @staticmethod
    def forward(ctx, x, forward_s: float, backward_s: float):
        ctx.backward_s = backward_s
        _sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.backward_s)
        return grad, None, None


class SleepLayer(torch.nn.Module):
    """``x * w`` (w a scalar parameter), costing ``forward_s``, ``input_s`` and ``weight_s``."""

    def __init__(self, width: int = 4, forward_s: float = 0.02, input_s: float = 0.02, weight_s: float = 0.02):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        # Makes the input path need a gradient even on the first stage (whose data needs none),
        # so every stage runs the same sleeps in every engine.
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.width = width
        self.forward_s, self.input_s, self.weight_s = forward_s, input_s, weight_s

    def forward(self, x):
        x = _Sleep.apply(x * self.scale, self.forward_s, self.input_s)
        w = _Sleep.apply(self.weight, 0.0, self.weight_s)
        return x * w


def sleep_loss(outputs, labels):
    return ((outputs - labels) ** 2).mean()
