"""Which engine moves an :class:`~deepscale.ops.aio.handle.AsyncIOHandle`'s bytes.

Backends, fastest first: ``io_uring`` (op ``async_io_uring``), ``libaio`` (op ``async_io``) and
``python`` (a thread pool of ``os.pread``/``os.pwrite``). ``auto`` takes the first that builds
and starts here; a backend that is skipped logs one warning naming its op and the reason.
``native`` asks for a compiled engine (io_uring, else libaio) and never the Python one.
The ``DEEPSCALE_AIO_BACKEND`` environment variable sets the choice when the handle is given
none.
"""
import os

from deepscale.ops.aio.fallback import PythonEngine
from deepscale.ops.aio.native_engine import NativeEngine
from deepscale.ops.op_loader import load_op, op_status
from deepscale.utils.logging import warning_once

ENV_VAR = "DEEPSCALE_AIO_BACKEND"
OPS = {"io_uring": "async_io_uring", "libaio": "async_io"}
_ORDER = {"auto": ("io_uring", "libaio", "python"), "io_uring": ("io_uring",), "libaio": ("libaio",),
          "python": ("python",), "native": ("io_uring", "libaio")}
CHOICES = tuple(_ORDER)


def requested_backend(backend=None):
    """The validated backend name: ``backend``, else ``$DEEPSCALE_AIO_BACKEND``, else ``"auto"``."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    if backend not in _ORDER:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, CHOICES))}, got {backend!r}")
    return backend


def _compiled_engine(name, args, next_name):
    """``(engine, None)`` for compiled backend ``name``, or ``(None, reason)``.

    A reason that ``load_op`` has not already logged is logged here when ``next_name`` (the
    backend tried next) is given.
    """
    op = OPS[name]
    reason = None
    if name == "io_uring":
        # Asked before any build: on a kernel that refuses io_uring the reason is logged from
        # here, naming the next backend, rather than by load_op (which names the PyTorch one).
        from op_builder import get_builder
        compat = get_builder(op).is_compatible()
        reason = None if compat else compat.reason
    if reason is None:
        instead = f"the {next_name} async I/O backend" if next_name else "no other backend (requested explicitly)"
        lib = load_op(op, fallback=instead)
        if lib is None:
            return None, (op_status(op) or (False, "not loaded"))[1]
        try:
            return NativeEngine(lib, *args), None
        except RuntimeError as exc:  # the kernel refused the queues (memlock limit, seccomp)
            reason = str(exc)
    if next_name is not None:
        warning_once(f"op '{op}' is not available ({reason}); async I/O uses the {next_name} backend instead")
    return None, reason


def open_engine(backend, args):
    """The engine of the first usable backend for choice ``backend``.

    Args:
        backend: one of :data:`CHOICES`.
        args: the engine constructor's arguments (block_size, queue_depth, single_submit,
            overlap_events, num_threads, use_direct).

    Raises:
        RuntimeError: no backend of the choice can run here (each one's reason, and the choices).
    """
    order = _ORDER[backend]
    reasons = []
    for i, name in enumerate(order):
        if name == "python":
            return PythonEngine(*args)
        engine, reason = _compiled_engine(name, args, order[i + 1] if i + 1 < len(order) else None)
        if engine is not None:
            return engine
        reasons.append(f"{name} (op '{OPS[name]}'): {reason}")
    raise RuntimeError(f"aio backend {backend!r} cannot run here: {'; '.join(reasons)}. Choices: "
                       f"{', '.join(map(repr, CHOICES))} (`deepscale report` shows which ops build)")
