"""What one checkpoint call records for its recomputation: inputs, RNG and autocast state."""
import contextlib
from typing import List

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from deepscale.accelerator import get_accelerator
from deepscale.parallel.random import RNGSnapshot
from deepscale.runtime.activation_checkpointing.saved_inputs import ContiguousSlots, save_input
from deepscale.runtime.activation_checkpointing.settings import settings, state


def _contiguous_slot():
    current, shared = settings(), state()
    # A checkpoint nested in a recomputation lives only until that backward step ends; giving it
    # a row would overwrite the input of a checkpoint of the forward not yet recomputed.
    if not current.contiguous_checkpointing or shared.recompute_depth:
        return None
    if shared.slots is None or shared.slots.num_checkpoints != current.num_checkpoints:
        shared.slots = ContiguousSlots(current.num_checkpoints)
    return shared.slots.next_call()


class CheckpointInputs:
    """The positional and keyword arguments of a call, any nesting; tensors are kept through
    :func:`save_input`, everything else by reference.

    Args:
        args: positional arguments.
        kwargs: keyword arguments.
    """

    def __init__(self, args, kwargs):
        flat, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.others = [None if isinstance(x, torch.Tensor) else x for x in flat]
        self.tensor_positions = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        slot, current = _contiguous_slot(), settings()
        self.saved = [save_input(flat[i], n, slot, current) for n, i in enumerate(self.tensor_positions)]

    def tensors(self, args, kwargs) -> List[torch.Tensor]:
        """The tensor leaves of ``(args, kwargs)`` in the order this object numbers them."""
        flat, _ = tree_flatten((tuple(args), dict(kwargs)))
        return [flat[i] for i in self.tensor_positions]

    def restore(self):
        """``(args, kwargs, tensors)``: rebuilt arguments whose tensors are fresh detached leaves."""
        tensors = [saved.restore() for saved in self.saved]
        flat = list(self.others)
        for position, tensor in zip(self.tensor_positions, tensors):
            flat[position] = tensor
        args, kwargs = tree_unflatten(flat, self.spec)
        return args, kwargs, tensors


class AutocastState:
    """Autocast settings active at the forward, re-entered for the recomputation."""

    def __init__(self):
        types = {"cpu", get_accelerator().device_name()}
        self.modes = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in sorted(types)]

    @contextlib.contextmanager
    def apply(self):
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.modes:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


class CallState:
    """Inputs, RNG states and autocast state of one checkpoint call, taken at its start."""

    def __init__(self, function, args, kwargs):
        self.function = function
        self.inputs = CheckpointInputs(args, kwargs)
        self.rng = RNGSnapshot()
        self.autocast = AutocastState()

    @contextlib.contextmanager
    def replay(self):
        """RNG and autocast as at the forward, gradients recorded."""
        shared = state()
        shared.recompute_depth += 1
        try:
            with self.rng.replay(), self.autocast.apply(), torch.enable_grad():
                yield
        finally:
            shared.recompute_depth -= 1
