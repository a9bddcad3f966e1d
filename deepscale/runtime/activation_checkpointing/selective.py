"""Selective activation checkpointing: keep the outputs of chosen ops, recompute the rest.

Recomputing cheap element-wise ops (norms, activations, dropout) while keeping the outputs of
the expensive matrix products trades a little memory for most of the recomputation time
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").
The policy machinery is PyTorch's (``torch.utils.checkpoint.create_selective_checkpoint_contexts``);
this module only names useful op sets and builds the ``context_fn`` that
:func:`non_reentrant_checkpoint` takes.
"""
import functools
from typing import Callable, Sequence, Union

import torch
from torch.utils.checkpoint import create_selective_checkpoint_contexts

# The aten ops a Linear layer or a matmul dispatches to.
MATMUL_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.baddbmm.default)


def selective_checkpoint_context(policy: Union[Sequence, Callable] = MATMUL_OPS) -> Callable:
    """A ``context_fn`` for :func:`non_reentrant_checkpoint` that keeps chosen op outputs.

    Args:
        policy: aten ops whose outputs are kept (everything else is recomputed), or a policy
            function ``(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy``.
            Default :data:`MATMUL_OPS`.

    Raises:
        TypeError: ``policy`` is neither a sequence of ops nor callable.
    """
    if callable(policy) and not isinstance(policy, torch._ops.OpOverload):
        return functools.partial(create_selective_checkpoint_contexts, policy)
    if isinstance(policy, (list, tuple)):
        return functools.partial(create_selective_checkpoint_contexts, list(policy))
    raise TypeError(f"selective_checkpoint_context(policy=...) takes a list of aten ops or a policy function, "
                    f"got {type(policy).__name__}")
