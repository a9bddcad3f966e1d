"""Non-reentrant activation checkpointing with saved-tensor hooks.

Note: how it works. The forward runs normally, recording the autograd graph, but under
``torch.autograd.graph.saved_tensors_hooks`` whose pack hook keeps only a numbered handle instead
of each tensor an op saves for backward. The first time backward unpacks a handle of the call,
the call's function is run again from its kept inputs (same RNG and autocast state) under hooks
that capture the tensors saved this time, in the same order; each unpack then hands out (and
drops) its tensor. Gradients flow through the one graph built in the forward, so every
parameter's gradient is accumulated once per backward, as without checkpointing - which is why
this mode is the one that composes with gradient hooks of data-parallel reducers, frozen and
shared parameters, ``torch.autograd.grad`` and nesting. PyTorch's
``torch.utils.checkpoint(use_reentrant=False)`` follows the same idea; this one adds host and
partitioned input storage and the model-parallel RNG tracker.
"""
import contextlib

import torch

from deepscale.runtime.activation_checkpointing.call_state import CallState
from deepscale.runtime.activation_checkpointing.settings import boundary


class _Handle:
    __slots__ = ("frame", "index")

    def __init__(self, frame, index):
        self.frame, self.index = frame, index


class _Frame(CallState):
    """One non-reentrant call: its handles and, once recomputed, the tensors they stand for."""

    def __init__(self, function, args, kwargs, recompute_context):
        super().__init__(function, args, kwargs)
        self.recompute_context = recompute_context
        self.num_saved = 0
        self.recomputed = {}

    def pack(self, tensor) -> _Handle:
        handle = _Handle(self, self.num_saved)
        self.num_saved += 1
        return handle

    def unpack(self, index: int) -> torch.Tensor:
        if index not in self.recomputed:
            self._recompute()
        return self.recomputed.pop(index)

    def _recompute(self) -> None:
        captured = []

        def capture(tensor):
            captured.append(tensor.detach())
            return len(captured) - 1

        args, kwargs, _ = self.inputs.restore()
        with boundary("recompute"), self.replay(), self.recompute_context(), \
                torch.autograd.graph.saved_tensors_hooks(capture, captured.__getitem__):
            self.function(*args, **kwargs)
        if len(captured) != self.num_saved:
            raise RuntimeError(f"activation checkpointing: the recomputation saved {len(captured)} tensors for "
                               f"backward, the forward {self.num_saved}; the checkpointed function must take the "
                               "same path and the same tensors must require grad in forward and recomputation")
        self.recomputed = dict(enumerate(captured))


def _unpack(handle: _Handle) -> torch.Tensor:
    return handle.frame.unpack(handle.index)


def non_reentrant_checkpoint(function, *args, context_fn=None, **kwargs):
    """Like :func:`checkpoint`, built on saved-tensor hooks instead of a nested backward.

    Works with ``torch.autograd.grad``, ``backward(inputs=...)``, nested checkpoints, keyword
    arguments and parameters shared inside and outside the checkpoint. The same settings apply
    (``checkpoint_in_cpu``, ``partition_activations``, contiguous slots, RNG replay).

    Args:
        function: the callable to checkpoint.
        *args, **kwargs: its arguments (``context_fn`` is taken by this function).
        context_fn: selective checkpointing: a callable returning two context managers, entered
            around the forward and around the recomputation, e.g.
            :func:`selective_checkpoint_context` or
            ``torch.utils.checkpoint.create_selective_checkpoint_contexts``. Default None.

    Returns:
        What ``function`` returns.

    Raises:
        RuntimeError: in backward, when the recomputation saved a different number of tensors.
    """
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    if context_fn is None:
        forward_context, recompute_context = contextlib.nullcontext(), contextlib.nullcontext()
    else:
        forward_context, recompute_context = context_fn()
    frame = _Frame(function, args, kwargs, lambda: recompute_context)
    with boundary("forward"), torch.autograd.graph.saved_tensors_hooks(frame.pack, _unpack), forward_context:
        return function(*args, **kwargs)

