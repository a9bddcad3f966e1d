"""Reentrant activation checkpointing: a custom autograd Function whose backward recomputes
the forward and runs a nested backward through it (DeepSpeed's ``checkpoint``).

Note: inputs that do not require grad. A custom Function's outputs require grad only when an
input does, so a checkpoint whose tensor inputs are all constants (the first layer fed by an
embedding that is not trained, or by raw data) would cut its parameters out of the graph and
their gradients would silently be None - the classic reentrant pitfall. ``checkpoint`` passes
an extra empty tensor that requires grad whenever gradients are being recorded, so the backward
always runs and the parameters inside get their gradients.

Note: parameters used inside and outside the checkpoint. A nested backward accumulates the
gradients of the parameters it reaches on its own, so a parameter also used outside the
checkpoint (tied embeddings, a shared layer) would receive two separate accumulations in one
backward and its post-accumulate-grad hook would fire twice; data-parallel reducers that launch
a bucket once all its parameters reported would then reduce it early and miss a part. So the
parameters of ``function`` (when it is a module or a module's method) are passed to the Function
as inputs: their gradients are computed with ``torch.autograd.grad`` and returned to the outer
graph, which accumulates them once, together with the other uses, as without checkpointing.
Parameters found only during the recomputation (a closure over another module) get a nested
backward. ZeRO-3 parameters that are still partitioned when the checkpoint starts cannot be
Function inputs (autograd would record their empty placeholder shape and refuse the full
gradient), so a module holding them is checkpointed by :func:`non_reentrant_checkpoint`, which
gives the same gradients with one accumulation per parameter.
"""
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from deepscale.runtime.activation_checkpointing.call_state import CallState
from deepscale.runtime.activation_checkpointing.non_reentrant import non_reentrant_checkpoint
from deepscale.runtime.activation_checkpointing.settings import boundary, note_once

_TENSOR = object()  # marks where an output tensor goes back


class _Call(CallState):
    """A reentrant call: also remembers how to rebuild the outputs around their tensors."""

    out_spec = None
    out_others = None
    num_out_tensors = 0
    num_inputs = 0
    params = ()


class CheckpointFunction(torch.autograd.Function):
    """``forward(ctx, call, dummy, *tensors)``: runs ``call.function`` without recording and
    returns the tensor leaves of its output; ``backward`` recomputes and backpropagates."""

    @staticmethod
    def forward(ctx, call: _Call, dummy, *tensors):
        args, kwargs = _rebuild(call, tensors[:call.num_inputs])
        with boundary("forward"):
            outputs = call.function(*args, **kwargs)
        flat, call.out_spec = tree_flatten(outputs)
        out_tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        call.out_others = [_TENSOR if isinstance(x, torch.Tensor) else x for x in flat]
        call.num_out_tensors = len(out_tensors)
        ctx.call = call
        # Kept by reference, not save_for_backward: an enclosing non-reentrant checkpoint's hooks
        # would hand back detached copies, which the recomputed graph does not use.
        call.params = tensors[call.num_inputs:]
        ctx.mark_non_differentiable(*[t for t in out_tensors if not t.is_floating_point()])
        return tuple(out_tensors)

    @staticmethod
    def backward(ctx, *grad_outputs):
        call = ctx.call
        args, kwargs, leaves = call.inputs.restore()
        with boundary("recompute"), call.replay():
            outputs = call.function(*args, **kwargs)
        out_tensors = [x for x in tree_flatten(outputs)[0] if isinstance(x, torch.Tensor)]
        if len(out_tensors) != call.num_out_tensors:
            raise RuntimeError(f"activation checkpointing: the recomputed function returned {len(out_tensors)} "
                               f"tensors, the forward {call.num_out_tensors}; the function must be deterministic "
                               "in its control flow")
        pairs = [(o, g) for o, g in zip(out_tensors, grad_outputs) if o.requires_grad and g is not None]
        params = call.params
        targets = [t for t in list(leaves) + list(params) if t.requires_grad]
        grads = {}
        if pairs:
            outs, gouts = [o for o, _ in pairs], [g for _, g in pairs]
            known = {id(t) for t in targets}
            others = [leaf for leaf in _graph_leaves(outs) if id(leaf) not in known]
            if targets:
                found = torch.autograd.grad(outs, targets, gouts, allow_unused=True, retain_graph=bool(others))
                grads = {id(t): g for t, g in zip(targets, found)}
            if others:
                if not torch.autograd._is_checkpoint_valid():
                    raise RuntimeError(
                        "deepscale.checkpointing.checkpoint (reentrant): the checkpointed function uses parameters "
                        "that are not its own module's, and their gradients cannot reach torch.autograd.grad() "
                        "or backward(inputs=...); checkpoint the module itself or use non_reentrant_checkpoint")
                torch.autograd.backward(outs, gouts, inputs=others)
        return (None, None) + tuple(grads.get(id(t)) for t in list(leaves) + list(params))


def _graph_leaves(outputs):
    """Every tensor the graph of ``outputs`` accumulates a gradient into."""
    seen, found, stack = set(), {}, [o.grad_fn for o in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


def _module_of(function):
    module = function if isinstance(function, torch.nn.Module) else getattr(function, "__self__", None)
    return module if isinstance(module, torch.nn.Module) else None


def _has_partitioned_params(function) -> bool:
    module = _module_of(function)
    return module is not None and any(p.shape != getattr(p, "ds_shape", p.shape) for p in module.parameters())


def _module_params(function):
    """Trainable parameters of ``function`` (a module or a bound method of one) that are whole now."""
    module = _module_of(function)
    return [] if module is None else [p for p in module.parameters() if p.requires_grad]


def _rebuild(call: _Call, tensors):
    flat = list(call.inputs.others)
    for position, tensor in zip(call.inputs.tensor_positions, tensors):
        flat[position] = tensor
    return tree_unflatten(flat, call.inputs.spec)


def checkpoint(function, *args, **kwargs):
    """Run ``function(*args, **kwargs)`` without keeping its activations; recompute them in backward.

    Only the tensor inputs are kept (whole, in host memory with ``checkpoint_in_cpu``, or split
    across the model-parallel group with ``partition_activations``). CPU, accelerator and
    model-parallel RNG states are replayed, so dropout masks in the recomputation are the same.
    Arguments and outputs may be nested tuples, lists and dicts holding tensors and other values.
    Parameters inside ``function`` get their gradients even when no tensor input requires grad.

    Args:
        function: the callable to checkpoint (a module or any function).
        *args, **kwargs: its arguments.

    Returns:
        What ``function`` returns.

    Raises:
        RuntimeError: in backward, when used under ``torch.autograd.grad`` (use
            :func:`non_reentrant_checkpoint`) or when the recomputation returns a different number
            of tensors.
    """
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    if _has_partitioned_params(function):
        note_once("reentrant_zero3", "activation checkpointing: checkpoint() of a module with ZeRO-3 partitioned "
                  "parameters runs the non-reentrant implementation (same gradients, one accumulation each)")
        return non_reentrant_checkpoint(function, *args, **kwargs)
    call = _Call(function, args, kwargs)
    tensors = call.inputs.tensors(args, kwargs)
    call.num_inputs = len(tensors)
    input_ids = {id(t) for t in tensors}
    params = [p for p in _module_params(function) if id(p) not in input_ids]
    needs_dummy = not any(t.requires_grad for t in tensors) and not params
    dummy = torch.empty(0, requires_grad=True) if needs_dummy else None
    out_tensors = CheckpointFunction.apply(call, dummy, *tensors, *params)
    iterator = iter(out_tensors)
    flat = [next(iterator) if other is _TENSOR else other for other in call.out_others]
    return tree_unflatten(flat, call.out_spec)
