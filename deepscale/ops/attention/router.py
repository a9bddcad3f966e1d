"""Pick the backend that runs one attention call, and say why when it is not the compiled kernel.

Order per device: CPU tensors try the ``cpu_attention`` kernel, then torch SDPA; CUDA tensors
try the ``flash_attn`` kernel, then torch SDPA; the PyTorch reference runs what nothing else
can (float64, dropout with softcap, odd head dims, ...). ``DEEPSCALE_ATTENTION_BACKEND``
(``auto``, ``sdpa``, ``reference``) skips the kernel (``sdpa``) or both (``reference``); a
forced SDPA that cannot run a call falls back to the reference, with the reason. Under a
TorchDispatchMode (flop counters, FakeTensorMode) the kernels are skipped too: such modes see
only aten ops, and fake tensors have no memory for a kernel to read. Each distinct fallback reason is logged once.
"""
import os
from dataclasses import dataclass

from deepscale.ops.attention import cpu_backend, cuda_backend, sdpa_backend
from deepscale.utils.logging import warning_once

BACKEND_ENV = "DEEPSCALE_ATTENTION_BACKEND"
CHOICES = ("auto", "sdpa", "reference")


@dataclass(frozen=True)
class Route:
    """Where a call runs: ``backend`` is ``cpu_attention``, ``flash_attn``, ``sdpa`` or ``reference``;
    ``reason`` says why the compiled kernel was passed over (empty when it runs), ``op`` is the loaded library."""

    backend: str
    reason: str = ""
    op: object = None


def _forced():
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a backend choice; allowed: {', '.join(CHOICES)}")
    return value


def _kernel_route(q, spec):
    """(Route or None, reason) for the device's compiled kernel."""
    from deepscale.ops.op_loader import load_op, op_status
    if q.device.type == "cpu":
        name, module = "cpu_attention", cpu_backend
    elif q.device.type == "cuda":
        name, module = "flash_attn", cuda_backend
    else:
        return None, f"no deepscale attention kernel for device type '{q.device.type}'"
    why = module.unsupported_reason(q, spec)
    if why:
        return None, why
    op = load_op(name, fallback="the PyTorch attention")
    if op is None:
        status = op_status(name)
        return None, f"op '{name}' is not available ({status[1] if status else 'not loaded'})"
    if name == "cpu_attention":
        cpu_backend.bind(op)
    return Route(name, "", op), ""


def _dispatch_mode_active():
    """True under a TorchDispatchMode (flop counters, FakeTensorMode, tracers): they see aten ops
    only, and the compiled kernels take raw pointers that fake tensors do not have."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # a torch without the helper: assume no mode
        return False
    return _get_current_dispatch_mode() is not None


def choose(q, spec):
    """The :class:`Route` of one call with tensor ``q`` and checked problem ``spec``."""
    forced = _forced()
    if forced != "auto":
        reason = f"{BACKEND_ENV}={forced}"
    elif _dispatch_mode_active():
        reason = "a TorchDispatchMode is active (flop counting, fake tensors or tracing): aten ops run so it sees them"
    else:
        route, reason = _kernel_route(q, spec)
        if route is not None:
            return route
    if forced != "reference":
        why = sdpa_backend.unsupported_reason(q, spec)
        if not why:
            return _announce(Route("sdpa", reason))
        reason = f"{reason}; {why}"
    return _announce(Route("reference", reason))


def _announce(route):
    if route.reason:
        warning_once(f"attention runs on {route.backend}: {route.reason}")
    return route
