"""The collective watchdog: reports (or aborts on) a blocking collective that waits too long.

Note: why and how. When ranks issue different collectives (a data-dependent branch, a rank that
skipped a backward or a checkpoint barrier), the process group only fails after its timeout (30
minutes by default) with a message that names nothing the user wrote. Every collective issued
through ``deepscale.comm`` is therefore registered here: a synchronous call for its duration,
an asynchronous one from ``work.wait()`` to its return. One daemon thread per process looks
every ``poll_s`` seconds; a wait older than ``timeout_s`` is reported once, naming the
collective (and the label its caller gave it, e.g. the ZeRO-3 parameter group and modules), the
training step, and what every other rank of the job last did. Ranks learn the last action of
their peers through the process group's key-value store: each watchdog thread publishes its
rank's last action there when it changed (at most once per poll, off the training thread), and
reads the others' only when it reports. With ``action="abort"`` the process then exits with
:data:`ABORT_EXIT_CODE` after printing the report to stderr, so a launcher tears the job down
within the timeout instead of leaving it hung for half an hour.

Cost when nothing hangs: issuing a collective stores a small tuple (no formatting), and a wait
adds and removes one dict entry: a few microseconds per collective, against 100 us or more for
the cheapest gloo collective. The thread starts with the first
registered wait.
"""
import itertools
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Dict, Optional

from deepscale.utils.logging import logger

DEFAULT_TIMEOUT_S = 300.0
ACTIONS = ("log", "abort")
TIMEOUT_ENV = "DEEPSCALE_WATCHDOG_TIMEOUT"
ACTION_ENV = "DEEPSCALE_WATCHDOG_ACTION"
ABORT_EXIT_CODE = 75
_STORE_PREFIX = "deepscale/watchdog/"


def _describe(record) -> str:
    name, numel, dtype, label, step = record
    text = f"{name} of {numel} {str(dtype).replace('torch.', '')} elements" if numel is not None else name
    label = label() if callable(label) else label  # formatted only when a report needs it
    if label:
        text += f" ({label})"
    return f"{text} at step {step}"


class CollectiveWatchdog:
    """Reports collectives that wait longer than ``timeout_s``.

    Args:
        timeout_s: seconds a wait may take before it is reported; 0 or less disables.
        action: ``"log"`` (report and keep waiting) or ``"abort"`` (report, then exit the process).
        rank: this process's global rank (for the message and the store key).
        world_size: ranks in the job (whose last actions are read from the store).
        store: a ``torch.distributed.Store`` shared by the job, or None (no peer information).
        poll_s: how often the thread looks. Default: a quarter of the timeout, at most 1 s.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, action: str = "log", rank: int = 0,
                 world_size: int = 1, store=None, poll_s: Optional[float] = None):
        if action not in ACTIONS:
            raise ValueError(f"collective_watchdog.action must be one of {ACTIONS}, got {action!r}")
        self.timeout_s, self.action = float(timeout_s), action
        self.rank, self.world_size, self.store = rank, world_size, store
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(self.timeout_s / 4, 0.01))
        self.step = 0
        self.last = None  # (name, numel, dtype, label, step) of the last collective issued
        self._local = threading.local()
        self._waits: Dict[int, list] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._published = None
        self.reports = []  # messages reported so far (tests and post-mortems read them)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    # --- the training thread ----------------------------------------------------------------
    @contextmanager
    def label(self, text):
        """Attach ``text`` (what the collectives issued inside the block are for) to their reports.

        ``text`` may be a zero-argument callable returning the text: hot paths pass one, so the
        text is only built when a report or the published last action needs it.
        """
        previous = getattr(self._local, "label", None)
        self._local.label = text
        try:
            yield
        finally:
            self._local.label = previous

    def issued(self, name: str, tensor=None) -> tuple:
        """Record that collective ``name`` was issued; returns the record to wait on."""
        if tensor is not None:
            record = (name, tensor.numel(), tensor.dtype, getattr(self._local, "label", None), self.step)
        else:
            record = (name, None, None, getattr(self._local, "label", None), self.step)
        self.last = record
        return record

    def begin_wait(self, record: tuple) -> int:
        """Register a wait on ``record``; pass the returned key to :meth:`end_wait`."""
        # No lock on this path: single dict operations are atomic in CPython, and the
        # watchdog thread copies the entries in one C call (list(dict.values())).
        key = next(self._ids)
        self._waits[key] = [time.monotonic(), record, False]
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._start_thread()
        return key

    def end_wait(self, key: int) -> None:
        self._waits.pop(key, None)

    @contextmanager
    def waiting(self, record: tuple):
        """Register a wait on ``record`` for the duration of the ``with`` block."""
        if not self.enabled:
            yield
            return
        key = self.begin_wait(record)
        try:
            yield
        finally:
            self.end_wait(key)

    def _start_thread(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="deepscale-collective-watchdog", daemon=True)
        self._thread.start()

    # --- the watchdog thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._publish()
            now = time.monotonic()
            overdue = [entry for entry in list(self._waits.values())
                       if not entry[2] and now - entry[0] > self.timeout_s]
            for entry in overdue:
                entry[2] = True
            for start, record, _ in overdue:
                self._report(now - start, record)

    def _publish(self) -> None:
        last = self.last
        if self.store is None or last is None or last is self._published:
            return
        try:
            self.store.set(f"{_STORE_PREFIX}{self.rank}", f"{_describe(last)}|{time.time():.3f}")
            self._published = last
        except Exception as error:  # a broken store must not kill the thread that reports hangs
            logger.debug(f"collective watchdog: cannot publish to the store: {error}")
            self.store = None

    def peer_actions(self) -> Dict[int, str]:
        """What every other rank last issued, as published in the store (rank -> text)."""
        out = {}
        if self.store is None:
            return out
        now = time.time()
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            try:
                if not self.store.check([f"{_STORE_PREFIX}{peer}"]):
                    out[peer] = "no collective issued yet"
                    continue
                text, _, stamp = self.store.get(f"{_STORE_PREFIX}{peer}").decode().rpartition("|")
                out[peer] = f"last issued {text} ({now - float(stamp):.1f}s ago)"
            except Exception as error:
                out[peer] = f"unknown ({error})"
        return out

    def _report(self, waited: float, record: tuple) -> None:
        peers = self.peer_actions()
        lines = "".join(f"\n  rank {peer}: {text}" for peer, text in sorted(peers.items()))
        message = (f"collective watchdog: rank {self.rank} has waited {waited:.1f}s for {_describe(record)}; "
                   f"another rank is probably in a different collective or stopped issuing them."
                   + (f" What the other ranks last did:{lines}" if lines else ""))
        self.reports.append(message)
        logger.error(message)
        if self.action == "abort":
            print(f"{message}\ncollective watchdog: aborting rank {self.rank} (action 'abort', "
                  f"exit code {ABORT_EXIT_CODE})", file=sys.stderr, flush=True)
            os._exit(ABORT_EXIT_CODE)

    def close(self) -> None:
        """Stop the thread (a later wait starts it again)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None


class WatchedWork:
    """The handle of an asynchronous collective; its ``wait()`` is watched.

    Everything else is delegated to the wrapped ``torch.distributed.Work``.
    """

    __slots__ = ("_work", "_record", "_watchdog")

    def __init__(self, work, record: tuple, watchdog: CollectiveWatchdog):
        self._work, self._record, self._watchdog = work, record, watchdog

    def wait(self, *args, **kwargs):
        watchdog = self._watchdog
        key = watchdog.begin_wait(self._record)
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            watchdog.end_wait(key)

    def __getattr__(self, name):
        return getattr(self._work, name)


def settings_from_env(timeout_s: float, action: str):
    """``(timeout_s, action)`` with ``DEEPSCALE_WATCHDOG_TIMEOUT`` / ``DEEPSCALE_WATCHDOG_ACTION`` applied."""
    raw_timeout = os.environ.get(TIMEOUT_ENV, "").strip()
    if raw_timeout:
        try:
            timeout_s = float(raw_timeout)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw_timeout!r}") from None
    raw_action = os.environ.get(ACTION_ENV, "").strip().lower()
    if raw_action:
        if raw_action not in ACTIONS:
            raise ValueError(f"{ACTION_ENV} must be one of {ACTIONS}, got {raw_action!r}")
        action = raw_action
    return timeout_s, action
