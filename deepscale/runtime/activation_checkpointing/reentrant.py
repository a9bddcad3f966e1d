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
a bucket once all its parameters reported would then reduce it early and miss a part. So
``checkpoint`` runs the function first (without recording) under a global module forward
pre-hook that notes every module it calls - the function may be a module, a method or a closure
over several layers, as in Megatron - and passes their trainable parameters to the Function as
inputs; the backward computes their gradients with ``torch.autograd.grad`` and returns them to
the outer graph, which accumulates them once, together with the other uses, as without
checkpointing. Tensors used without a module call (a bare ``nn.Parameter`` in a closure) get a
nested backward. ZeRO-3 parameters are partitioned again after the run and cannot be Function
inputs (autograd would record their empty placeholder shape and refuse the full gradient), so
such a function is run by :func:`non_reentrant_checkpoint` from the same RNG states (same
outputs, one accumulation per parameter); its code object is remembered so later calls go
there directly.

Note: enclosing non-reentrant checkpoints. The parameters are kept on the call object, not with
``save_for_backward``: an enclosing non-reentrant checkpoint's hooks would hand back detached
copies, which the recomputed graph does not use.
"""
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from deepscale.runtime.activation_checkpointing.call_state import CallState
from deepscale.runtime.activation_checkpointing.non_reentrant import non_reentrant_checkpoint
from deepscale.runtime.activation_checkpointing.settings import boundary, note_once

_TENSOR = object()  # marks where an output tensor goes back


class _Call(CallState):
    """A reentrant call: also remembers how to rebuild the outputs around their tensors."""

    outputs = None
    out_spec = None
    out_others = None
    num_out_tensors = 0
    params = ()


class CheckpointFunction(torch.autograd.Function):
    """``forward(ctx, call, dummy, *tensors, *params)``: returns the output tensors of the run that
    :func:`checkpoint` made; ``backward`` recomputes and backpropagates."""

    @staticmethod
    def forward(ctx, call: _Call, dummy, *tensors):
        # The function already ran in checkpoint() (to find the modules it calls); only its
        # output tensors pass through here so that autograd connects them to this node.
        out_tensors, call.outputs = call.outputs, None
        ctx.call = call
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
                        "deepscale.checkpointing.checkpoint (reentrant): the checkpointed function uses tensors that "
                        "require grad outside any module call (e.g. a bare nn.Parameter in a closure); their "
                        "gradients cannot reach torch.autograd.grad() or backward(inputs=...). Wrap them in a "
                        "module or use non_reentrant_checkpoint")
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


def _is_partitioned(param) -> bool:
    return param.shape != getattr(param, "ds_shape", param.shape)


# Code objects of functions found to run modules with ZeRO-3 partitioned parameters.
_PARTITIONED_CODE = set()


def _runs_partitioned_params(function) -> bool:
    module = _module_of(function)
    if module is not None:
        return any(_is_partitioned(p) for p in module.parameters())
    return getattr(function, "__code__", None) in _PARTITIONED_CODE


class _ModulesRun:
    """Records every module whose forward starts inside the context (a global pre-hook)."""

    def __enter__(self):
        self.modules = {}
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._seen)
        return self

    def _seen(self, module, args):
        self.modules[id(module)] = module

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def trainable_params(self, exclude_ids):
        found = {}
        for module in self.modules.values():
            for param in module.parameters():
                if param.requires_grad and id(param) not in exclude_ids:
                    found[id(param)] = param
        return list(found.values())


def checkpoint(function, *args, **kwargs):
    """Run ``function(*args, **kwargs)`` without keeping its activations; recompute them in backward.

    Only the tensor inputs are kept (whole, in host memory with ``checkpoint_in_cpu``, or split
    across the model-parallel group with ``partition_activations``). CPU, accelerator and
    model-parallel RNG states are replayed, so dropout masks in the recomputation are the same.
    Arguments and outputs may be nested tuples, lists and dicts holding tensors and other values.
    Parameters inside ``function`` get their gradients even when no tensor input requires grad,
    accumulated once per backward even when they are also used outside the checkpoint.

    Args:
        function: the callable to checkpoint (a module or any function).
        *args, **kwargs: its arguments.

    Returns:
        What ``function`` returns.

    Raises:
        RuntimeError: in backward, under ``torch.autograd.grad`` when the function uses tensors that
            require grad outside any module call (use :func:`non_reentrant_checkpoint`), or when the
            recomputation returns a different number of tensors.
    """
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    if _runs_partitioned_params(function):
        return _non_reentrant_for_zero3(function, args, kwargs)
    call = _Call(function, args, kwargs)
    with torch.no_grad(), boundary("forward"), _ModulesRun() as run:
        outputs = function(*args, **kwargs)
    tensors = call.inputs.tensors(args, kwargs)
    params = run.trainable_params({id(t) for t in tensors})
    if any(_is_partitioned(p) for p in params):
        # ZeRO-3 released them during the run: they cannot be Function inputs. Run again from the
        # same RNG states without reentrancy (same outputs); remembered for the next calls.
        if getattr(function, "__code__", None) is not None:
            _PARTITIONED_CODE.add(function.__code__)
        call.rng.restore()
        return _non_reentrant_for_zero3(function, args, kwargs)
    flat, call.out_spec = tree_flatten(outputs)
    call.outputs = [x for x in flat if isinstance(x, torch.Tensor)]
    call.out_others = [_TENSOR if isinstance(x, torch.Tensor) else x for x in flat]
    call.num_out_tensors = len(call.outputs)
    needs_dummy = not any(t.requires_grad for t in tensors) and not params
    dummy = torch.empty(0, requires_grad=True) if needs_dummy else None
    call.params = tuple(params)  # see the note on enclosing non-reentrant checkpoints
    out_tensors = CheckpointFunction.apply(call, dummy, *tensors, *params)
    iterator = iter(out_tensors)
    flat = [next(iterator) if other is _TENSOR else other for other in call.out_others]
    return tree_unflatten(flat, call.out_spec)


def _non_reentrant_for_zero3(function, args, kwargs):
    note_once("reentrant_zero3", "activation checkpointing: checkpoint() of modules with ZeRO-3 partitioned "
              "parameters runs the non-reentrant implementation (same gradients, one accumulation each)")
    return non_reentrant_checkpoint(function, *args, **kwargs)
