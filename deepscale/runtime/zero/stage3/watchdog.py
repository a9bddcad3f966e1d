"""A watchdog that reports, on every rank, a ZeRO-3 collective that waits too long.

Note: why a watchdog. When ranks issue different collectives (a data-dependent branch, a rank
that skipped a backward), the process group only fails after its timeout (30 minutes by
default) with a message that names no module. The watchdog runs one daemon thread per
stage-3 optimizer; every collective wait registers what it waits for, and a wait older than
``timeout_s`` is logged once on the rank that is stuck, naming the collective, the parameter
group, its modules and parameters and the training step, long before the group times out.
"""
import itertools
import threading
import time
from contextlib import contextmanager
from typing import Dict, Optional

from deepscale.utils.logging import logger

DEFAULT_WATCHDOG_TIMEOUT_S = 300.0


class Watchdog:
    """Logs waits that exceed ``timeout_s``.

    Args:
        timeout_s: seconds a wait may take before it is reported; 0 or less disables.
        rank: this process's rank, for the message.
        poll_s: how often the thread looks. Default: a quarter of the timeout, at most 1 s.
    """

    def __init__(self, timeout_s: float = DEFAULT_WATCHDOG_TIMEOUT_S, rank: int = 0, poll_s: Optional[float] = None):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(self.timeout_s / 4, 0.01))
        self._waits: Dict[int, list] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reports = []  # messages logged so far (tests and post-mortems read them)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="deepscale-zero3-watchdog", daemon=True)
            self._thread.start()

    @contextmanager
    def watch(self, description: str):
        """Register a wait for the duration of the ``with`` block."""
        if not self.enabled:
            yield
            return
        key = next(self._ids)
        with self._lock:
            self._waits[key] = [time.monotonic(), description, False]
            self._ensure_thread()
        try:
            yield
        finally:
            with self._lock:
                self._waits.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            with self._lock:
                overdue = [entry for entry in self._waits.values() if not entry[2] and now - entry[0] > self.timeout_s]
                for entry in overdue:
                    entry[2] = True
            for start, description, _ in overdue:
                message = (f"ZeRO-3 watchdog: rank {self.rank} has waited {now - start:.1f}s for {description}; "
                           "another rank is probably in a different collective (enable the ZeRO-3 sequence check "
                           "with DEEPSCALE_ZERO3_DEBUG=1 to find where ranks diverge)")
                self.reports.append(message)
                logger.error(message)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
