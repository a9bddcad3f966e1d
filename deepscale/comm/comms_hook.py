"""The communication logger's hook into the collective wrappers of ``deepscale.comm``.

``logged(op, size_fn)`` decorates a wrapper in ``comm.py``. While the logger is off a call
costs one attribute check. While it is on, the call is counted with its message size when it
is issued, and its latency is measured:

* synchronous calls: from just before the call to its return (on an accelerator, the device
  is synchronised on both sides so the time is the collective's own);
* ``async_op=True`` calls: from the issue to the moment the caller's ``wait()`` returns (the
  returned work handle is wrapped to see that moment). Overlapped work the caller does
  before waiting is included, so this is an upper bound of the collective's own duration.

The decorator also accepts DeepSpeed's extra keyword arguments on every wrapped function:
``prof`` (record this call even when ``prof_all`` is false), ``log_name`` (the record name)
and ``debug`` (ignored; the ``debug`` config setting names the caller instead).
"""
import functools
import inspect
import sys
import time

from deepscale.accelerator import get_accelerator
from deepscale.utils.comms_logging import CommsLogger
from deepscale.utils.logging import log_dist, logger

# One logger per process, like the default process group it observes.
comms_logger = CommsLogger()


def _sync() -> None:
    if get_accelerator().device_name() != "cpu":
        get_accelerator().synchronize()


class _TimedWork:
    """Wraps an async work handle so the logger sees when ``wait()`` returns."""

    def __init__(self, work, on_done):
        self._work, self._on_done = work, on_done

    def wait(self, *args, **kwargs):
        result = self._work.wait(*args, **kwargs)
        if self._on_done is not None:
            _sync()
            self._on_done()
            self._on_done = None
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


def logged(op: str, size_fn):
    """Decorate a collective wrapper so the comms logger can record it.

    Args:
        op: the collective's name (selects the bus-bandwidth factor).
        size_fn: the message size in bytes from the wrapper's arguments, given as a dict by
            parameter name (defaults filled in).
    """

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, prof: bool = False, log_name=None, debug=None, **kwargs):
            if not comms_logger.enabled or not comms_logger.wants(op, prof):
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return _record_call(fn, op, size_fn(bound.arguments), bound.arguments, log_name, args, kwargs)

        wrapper.__wrapped_op__ = op
        return wrapper

    return decorate


def _record_call(fn, op, msg_bytes, arguments, log_name, args, kwargs):
    from deepscale.comm import comm  # the group size helper lives with the wrappers

    name = log_name or op
    if comms_logger.debug:
        name = f"{name} | [Caller Func: {sys._getframe(2).f_code.co_name}]"
    record = comms_logger.count(name, op, msg_bytes, comm.get_world_size(arguments.get("group")))
    _sync()
    start = time.perf_counter()

    def done():
        comms_logger.add_latency(record, name, msg_bytes, time.perf_counter() - start, logger.info)

    result = fn(*args, **kwargs)
    if arguments.get("async_op") or op in ("isend", "irecv"):
        return _TimedWork(result, done) if result is not None else result
    _sync()
    done()
    return result


def configure(deepspeed_config=None, enabled=None, prof_all=None, prof_ops=None, verbose=None, debug=None) -> None:
    """Set up the communication logger (DeepSpeed's ``deepspeed.comm.configure``).

    Args:
        deepspeed_config: a parsed config (its ``comms_logger`` section) or a config dict; its
            values are applied first. Default None.
        enabled, prof_all, prof_ops, verbose, debug: override single settings (None keeps the
            current one). ``prof_ops`` is a list of op names recorded when ``prof_all`` is false.
    """
    if deepspeed_config is not None:
        section = (deepspeed_config.get("comms_logger", {}) if isinstance(deepspeed_config, dict)
                   else getattr(deepspeed_config, "comms_logger", None))
        if section is None:
            raise TypeError("deepscale.comm.configure: deepspeed_config must be a config dict or a parsed "
                            f"config with a comms_logger section, got {type(deepspeed_config).__name__}")
        if not isinstance(section, dict):
            section = section.model_dump() if hasattr(section, "model_dump") else vars(section)
        comms_logger.configure(**{k: section.get(k) for k in ("enabled", "verbose", "prof_all", "prof_ops",
                                                              "debug")})
    comms_logger.configure(enabled=enabled, verbose=verbose, prof_all=prof_all, prof_ops=prof_ops, debug=debug)


def reset_comms_log() -> None:
    """Forget everything the communication logger recorded so far."""
    comms_logger.reset()


def log_summary(show_straggler: bool = False, return_dict: bool = False):
    """Print the communication summary on rank 0 (DeepSpeed's ``deepspeed.comm.log_summary``).

    Args:
        show_straggler: add a column with this op's total latency minus the smallest total
            latency of the same op and size on any rank (time lost waiting for the slowest
            rank). Every rank must call it then: the totals are exchanged. Default False.
        return_dict: return the raw data of :meth:`CommsLogger.summary_dict` (with a
            ``straggler_ms`` field per entry when ``show_straggler``). Default False.
    """
    from deepscale.comm import comm

    summary = comms_logger.summary_dict()
    straggler = None
    if show_straggler and comm.is_initialized() and comm.get_world_size() > 1:
        totals = {name: {size: row["total_latency_ms"] for size, row in by_size.items()}
                  for name, by_size in summary.items()}
        gathered = [None] * comm.get_world_size()
        enabled, comms_logger.enabled = comms_logger.enabled, False  # do not log our own exchange
        try:
            comm.all_gather_object(gathered, totals)
        finally:
            comms_logger.enabled = enabled
        straggler = {name: {size: total - min(g.get(name, {}).get(size, total) for g in gathered)
                            for size, total in by_size.items()} for name, by_size in totals.items()}
        for name, by_size in summary.items():
            for size, row in by_size.items():
                row["straggler_ms"] = straggler[name][size]
    log_dist("communication summary\n" + CommsLogger.format_summary(summary, straggler), ranks=[0])
    return summary if return_dict else None
