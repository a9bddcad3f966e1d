"""Shared machinery of the CPU optimizers (Adam, Adagrad, Lion) that ZeRO-Offload runs.

Parameters live in host memory as fp32, bf16 or fp16; optimizer states are fp32 (or the
parameter dtype with ``fp32_optimizer_states=False``). One ``step`` hands every parameter of
a group to the compiled kernel in a single call, which updates parameter and states in one
pass and can write the new parameter as bf16/fp16 into a second buffer in the same pass
(``fp16_param_groups``: the copy ZeRO-Offload sends back to the device).
When the op cannot be built, the same update runs in PyTorch (fp32 math).
"""
import operator

import torch

from deepscale.ops.native import check, int64_array
from deepscale.ops.op_loader import load_op

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def step_tensor(value):
    """A step count as torch's optimizers keep it: a 0-dim float32 tensor (checkpoints interchange)."""
    return torch.tensor(float(value), dtype=torch.float32)


def fill_group_defaults(optimizer):
    """Give every param group the optimizer's defaults it lacks.

    ``load_state_dict`` replaces the groups by the saved ones; a state dict of another Adam
    (torch's AdamW has no ``bias_correction``) would otherwise leave keys our step reads unset.
    """
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)


def load_keeping_state_dtype(optimizer, state_dict, fp32=True):
    """``optimizer.load_state_dict`` that keeps moments fp32 and steps as :func:`step_tensor`.

    ``torch.optim.Optimizer`` casts floating-point state to the parameter dtype on load, which
    would round fp32 moments of bf16 parameters to bf16; this puts the saved values back in
    fp32 (``fp32=False``: the parameter dtype), and fills group keys the saved groups lack.
    """
    saved = {key: {n: v.detach().clone() for n, v in entry.items() if isinstance(v, torch.Tensor)}
             for key, entry in state_dict["state"].items()}
    torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
    fill_group_defaults(optimizer)
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups):
        for key, param in zip(saved_group["params"], group["params"]):
            state = optimizer.state[param]
            for name, value in saved.get(key, {}).items():
                if name != "step":
                    dtype = torch.float32 if fp32 else param.dtype
                    state[name] = value.to(device=param.device, dtype=dtype).contiguous()
            if "step" in state:
                state["step"] = step_tensor(state["step"])


def _code(tensor):
    return -1 if tensor is None else _DTYPE_CODE[tensor.dtype]


def _ptr(tensor):
    return 0 if tensor is None else tensor.data_ptr()


class CPUOptimizerBase(torch.optim.Optimizer):
    """Base of the compiled CPU optimizers; subclasses set ``OP_NAME``/``STATE_NAMES`` and the math.

    Args:
        params: iterable of parameters or parameter-group dicts.
        defaults: default hyperparameters of each group.
        fp32_optimizer_states: keep states in fp32 for bf16/fp16 parameters. Default True.
        num_threads: OpenMP threads of the kernel; None means ``torch.get_num_threads()``.
    """

    OP_NAME = ""
    STATE_NAMES = ()

    def __init__(self, params, defaults, fp32_optimizer_states=True, num_threads=None):
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        super().__init__(params, defaults)
        self.fp32_optimizer_states = bool(fp32_optimizer_states)
        self.num_threads = num_threads
        self._plans = {}  # group index -> packed slots of the last step (see _signature)
        getter = operator.itemgetter(*self.STATE_NAMES)
        # state dict -> its state tensors, in STATE_NAMES order (one C call per parameter)
        self._state_tensors = getter if len(self.STATE_NAMES) > 1 else (lambda state: (getter(state),))
        self._op = load_op(self.OP_NAME)

    @property
    def uses_compiled_op(self):
        """True when steps run the compiled kernel, False on the PyTorch fallback."""
        return self._op is not None

    # --- subclass hooks --------------------------------------------------------------------
    def _kernel_step(self, slots, num_values, group, step, num_threads):
        """Call the op's C entry point on a packed slot array; return its status code."""
        raise NotImplementedError

    def _torch_step(self, param, grad, states, group, step):
        """Update fp32 ``param`` and ``states`` in place (the fallback)."""
        raise NotImplementedError

    # --- checks ----------------------------------------------------------------------------
    def _checked_grad(self, param):
        if param.device.type != "cpu":
            raise ValueError(f"{type(self).__name__} updates CPU parameters; got one on {param.device}")
        if param.dtype not in _DTYPE_CODE:
            raise TypeError(f"{type(self).__name__} supports float32, bfloat16 and float16 parameters, got {param.dtype}")
        if not param.is_contiguous():
            raise ValueError(f"{type(self).__name__} needs contiguous parameters (shape {tuple(param.shape)})")
        grad = param.grad
        if grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")
        if grad.dtype not in (torch.float32, param.dtype):
            grad = grad.float()
        return grad.contiguous()

    @staticmethod
    def _checked_out(out, param):
        if out is None:
            return None
        if out.dtype not in _HALF_DTYPES or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("fp16_param_groups tensors must be contiguous CPU bfloat16/float16 tensors, "
                             f"got {out.dtype} on {out.device}")
        if out.numel() != param.numel():
            raise ValueError(f"fp16_param_groups tensor has {out.numel()} elements, its parameter {param.numel()}")
        return out

    def _init_state(self, param, group):
        state = self.state[param]
        if not state:
            dtype = torch.float32 if self.fp32_optimizer_states else param.dtype
            state["step"] = step_tensor(0)
            for name in self.STATE_NAMES:
                state[name] = torch.zeros(param.shape, dtype=dtype)
        elif not torch.is_tensor(state.get("step")):
            # loaded state: an int step (older checkpoints) or none (FusedAdam counts per group)
            state["step"] = step_tensor(state.get("step", group.get("step", 0)))
        return state

    def _out_lists(self, fp16_param_groups):
        if fp16_param_groups is None:
            return [None] * len(self.param_groups)
        groups = list(fp16_param_groups)
        if groups and isinstance(groups[0], torch.Tensor):  # a single flat list for a single group
            groups = [groups]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"fp16_param_groups has {len(groups)} groups, the optimizer {len(self.param_groups)}")
        return [list(g) for g in groups]

    # --- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, fp16_param_groups=None):
        """Run one optimizer step.

        Args:
            closure: re-evaluates the model and returns the loss. Default None.
            fp16_param_groups: per parameter group, a list of bf16/fp16 CPU tensors (one per
                parameter, same order) that receive the updated parameters in the same pass.
                Default None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, (group, outs) in enumerate(zip(self.param_groups, self._out_lists(fp16_param_groups))):
            if not self._planned_step(index, group, outs):
                self._checked_step(index, group, outs)
        return loss

    def _checked_step(self, group_index, group, outs):
        """Validate every tensor, pack the slots and run; remember the packing when reusable."""
        by_step, reusable = {}, True
        for index, param in enumerate(group["params"]):
            if param.grad is None:
                reusable = False
                continue
            grad = self._checked_grad(param)
            reusable = reusable and grad is param.grad  # a converted grad is a temporary
            out = self._checked_out(outs[index] if outs is not None else None, param)
            state = self._init_state(param, group)
            state["step"] += 1  # in place: the tensor stays the one the signature names
            states = [state[name] for name in self.STATE_NAMES]
            by_step.setdefault(int(state["step"]), []).append((param, grad, states, out))
        self._plans.pop(group_index, None)
        for step, items in by_step.items():
            flat = self._apply(group, step, items)
            if reusable and flat is not None and len(by_step) == 1:
                signature, states = self._signature(group, outs)
                steps = [state["step"] for state in states]
                self._plans[group_index] = (signature, int64_array(flat), len(flat), step, steps)

    # Note: a plan is the packed slot array of a group from its last step. ZeRO-Offload calls
    # step on the same tensors every iteration, so re-validating and re-packing 100s of tensors
    # in Python would cost more than the update of a small model. The signature holds every
    # address and grad dtype the array was built from, and the identity of every step tensor
    # (the plan keeps them alive, so an id is never reused); any change (new grad tensor
    # elsewhere, swapped-in states, a step restored from a checkpoint, another copy-out buffer)
    # misses the plan and takes the checked path.
    def _signature(self, group, outs):
        """``(signature, state dicts)`` of ``group``; ``(None, None)`` when a parameter has no grad or state."""
        data_ptr, get_state, state_tensors = torch.Tensor.data_ptr, self.state.get, self._state_tensors
        sig, states = [], []
        for param in group["params"]:
            grad = param.grad
            state = get_state(param)
            if grad is None or not state:
                return None, None
            states.append(state)
            sig += (param.data_ptr(), param.dtype, grad.data_ptr(), grad.dtype, grad.is_contiguous())
            sig += map(data_ptr, state_tensors(state))
            sig.append(id(state.get("step")))
        if outs is not None:
            sig += map(data_ptr, outs)
        return sig, states

    def _planned_step(self, group_index, group, outs):
        plan = self._plans.get(group_index)
        if plan is None or self._op is None:
            return False
        signature, slots, num_values, step, steps = plan
        current, _ = self._signature(group, outs)
        if current != signature:
            return False
        step += 1
        torch._foreach_add_(steps, 1.0)
        threads = self.num_threads or torch.get_num_threads()
        check(self._op, self._kernel_step(slots, num_values, group, step, threads), f"{type(self).__name__}.step")
        self._plans[group_index] = (signature, slots, num_values, step, steps)
        return True

    def _apply(self, group, step, items):
        """Run one step on ``items``; returns the packed slot list when the kernel ran."""
        if self._op is not None:
            flat = []
            for param, grad, states, out in items:
                second = states[1] if len(states) > 1 else None
                flat += [param.data_ptr(), grad.data_ptr(), states[0].data_ptr(), _ptr(second), _ptr(out),
                         param.numel(), _code(param), _code(grad), _code(states[0]), _code(out)]
            threads = self.num_threads or torch.get_num_threads()
            rc = self._kernel_step(int64_array(flat), len(flat), group, step, threads)
            check(self._op, rc, f"{type(self).__name__}.step")
            return flat
        for param, grad, states, out in items:
            p32, s32 = param.float(), [s.float() for s in states]
            self._torch_step(p32, grad.float(), s32, group, step)
            if p32.data_ptr() != param.data_ptr():
                param.copy_(p32)
            for s, s_new in zip(states, s32):
                if s_new.data_ptr() != s.data_ptr():
                    s.copy_(s_new)
            if out is not None:
                out.copy_(p32)
        return None

    # --- checkpoints -----------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """Load a state dict, keeping fp32 states fp32 even for half-precision parameters.

        A state dict of torch's optimizer of the same algorithm loads too (same state names).

        ``torch.optim.Optimizer`` casts floating-point state to the parameter dtype on load,
        which would round fp32 moments of bf16 parameters to bf16.
        """
        self._plans.clear()
        load_keeping_state_dtype(self, state_dict, fp32=self.fp32_optimizer_states)
