"""Load a compiled op, or explain once why the PyTorch fallback runs instead.

Features call :func:`load_op` and branch on ``None``; a build never blocks a run: a missing
toolchain or a compile error becomes one warning line naming the op and the reason.
"""
import ctypes
import os
import threading

from deepscale.ops.native import bind
from deepscale.utils.logging import logger

_STATUS = {}
_LOCK = threading.Lock()


def _first_line(text):
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    # The builder's message starts "building op ... failed:"; the next line is the compiler's first error.
    for line in lines:
        if "error" in line.lower() and "failed:" not in line:
            return line
    return lines[0] if lines else "unknown error"


def load_op(name, verbose=False, fallback="the PyTorch implementation"):
    """The compiled module of op ``name``, or None when it cannot be built or loaded here.

    The first failure for an op logs one warning: ``op '<name>' is not available (<reason>);
    using <fallback>``. Set ``DEEPSCALE_DISABLE_OPS=1`` (or a comma list of op names) to force
    the fallbacks.

    Args:
        name: op name, one of ``op_builder.ALL_OPS``.
        verbose: show the build's compiler commands and output. Default False.
        fallback: what the caller uses instead, for the warning. Default "the PyTorch implementation".
    """
    with _LOCK:
        if name in _STATUS:
            return _STATUS[name][0]
        disabled = os.environ.get("DEEPSCALE_DISABLE_OPS", "")
        if disabled == "1" or name in [d.strip() for d in disabled.split(",")]:
            module, reason = None, "disabled by DEEPSCALE_DISABLE_OPS"
        else:
            module, reason = _try_load(name, verbose)
        _STATUS[name] = (module, reason)
        if module is None:
            logger.warning(f"op '{name}' is not available ({reason}); using {fallback}")
        return module


def _try_load(name, verbose):
    try:
        from op_builder import get_builder
        from op_builder.builder import OpBuildError
    except ImportError as exc:  # an install without op_builder
        return None, f"op_builder is not importable: {exc}"
    try:
        module = get_builder(name).load(verbose=verbose)
        if isinstance(module, ctypes.CDLL):
            bind(module)
        return module, ""
    except OpBuildError as exc:
        message = str(exc)
        if "cannot be built:" in message:
            return None, message.split("cannot be built:", 1)[1].strip()
        return None, f"build failed: {_first_line(message)}"
    except Exception as exc:  # never let an op failure stop training; say what happened
        return None, f"{type(exc).__name__}: {exc}"


def op_status(name):
    """``(loaded, reason)`` for an op that :func:`load_op` has tried in this process, else None."""
    entry = _STATUS.get(name)
    return None if entry is None else (entry[0] is not None, entry[1])


def reset_op_cache():
    """Forget every load attempt (tests use it to retry under a changed environment)."""
    with _LOCK:
        _STATUS.clear()
