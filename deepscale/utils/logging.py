"""Logging helpers: one package logger and rank-aware printing.

Note: how the ``deepscale`` logger meets the application's logging. It is an
ordinary ``logging`` logger that propagates to the root logger, so an
application that configures logging (``logging.basicConfig``, handlers on the
root logger, pytest's ``caplog``) receives deepscale's records through its own
handlers and format, printed once. For an application that configured nothing,
the logger also carries a default handler (``[time] [LEVEL] [deepscale] msg``
on stdout), which stays silent as soon as the root logger has a handler, so the
two never print the same line twice. The level is INFO (the step lines are
INFO), or ``DEEPSCALE_LOG_LEVEL``; change it with
``logging.getLogger("deepscale").setLevel(...)``.

These helpers import nothing from the rest of deepscale so any layer may use them.
"""
import logging
import os
import sys

_FORMAT = "[%(asctime)s] [%(levelname)s] [deepscale] %(message)s"


class _DefaultHandler(logging.StreamHandler):
    """Prints deepscale's records only while the application has configured no root handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the record propagates to the application's handlers instead
        self.stream = sys.stdout  # the current one, so redirections of sys.stdout are followed
        super().emit(record)


def _create_logger(name: str = "deepscale") -> logging.Logger:
    log = logging.getLogger(name)
    if not any(isinstance(h, _DefaultHandler) for h in log.handlers):
        handler = _DefaultHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(os.environ.get("DEEPSCALE_LOG_LEVEL", "INFO").upper())
    log.propagate = True
    return log


logger = _create_logger()


def _current_rank() -> int:
    """The global rank, without requiring torch.distributed to be initialised."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


def log_dist(message: str, ranks=None, level: int = logging.INFO) -> None:
    """Log ``message`` on the given global ranks only.

    Args:
        message: text to log.
        ranks: iterable of ranks that log; ``None`` or ``[-1]`` means every rank. Default ``None``.
        level: a ``logging`` level. Default ``logging.INFO``.
    """
    rank = _current_rank()
    ranks = list(ranks) if ranks is not None else [-1]
    if -1 in ranks or rank in ranks:
        logger.log(level, f"[Rank {rank}] {message}")


def print_rank_0(message: str) -> None:
    """Print ``message`` on global rank 0 only."""
    if _current_rank() == 0:
        print(message, flush=True)


def warning_once(message: str, _seen=set()) -> None:
    """Log a warning the first time a given message is seen in this process."""
    if message not in _seen:
        _seen.add(message)
        logger.warning(message)
