"""Logging helpers: one package logger and rank-aware printing.

These helpers import nothing from the rest of deepscale so any layer may use them.
"""
import logging
import os
import sys

_FORMAT = "[%(asctime)s] [%(levelname)s] [deepscale] %(message)s"


def _create_logger(name: str = "deepscale") -> logging.Logger:
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(stream=sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(os.environ.get("DEEPSCALE_LOG_LEVEL", "INFO").upper())
    log.propagate = False
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
