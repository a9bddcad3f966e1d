"""Stop requests: signals caught by a launcher, or an abort from the job controller.

Handlers only record the request; the launcher's main loop acts on it, because doing real
work (killing, logging) inside a signal handler is unsafe.
"""
import signal
import threading
from typing import Optional

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """Thread-safe record of "stop the job".

    The first request decides the signal forwarded to the ranks; ``force`` (kill at once)
    is set by an explicit forced request or by a second signal from outside.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.signum: Optional[int] = None
        self.count = 0
        self.reason = ""
        self.from_user = False
        self.force = False

    def request(self, signum: int, reason: str = "", from_user: bool = False, force: bool = False) -> None:
        """Record a request to stop with ``signum``.

        Args:
            reason: shown in messages.
            from_user: the request comes from a signal sent to this process.
            force: kill without waiting for a graceful exit.
        """
        with self._lock:
            if self.signum is None:
                self.signum, self.reason, self.from_user = signum, reason, from_user
            elif from_user:
                self.force = True  # a second Ctrl-C means "now"
            self.force = self.force or force
            self.count += 1

    @property
    def requested(self) -> bool:
        """True once any stop was requested."""
        return self.signum is not None


def install_handlers(stop: StopRequest):
    """Route SIGINT/SIGTERM/SIGHUP into ``stop``; returns the previous handlers for :func:`restore_handlers`."""
    def handler(signum, _frame):
        stop.request(signum, reason=f"received {signal.Signals(signum).name}", from_user=True)

    previous = {}
    for signum in FORWARDED_SIGNALS:
        previous[signum] = signal.signal(signum, handler)
    return previous


def restore_handlers(previous) -> None:
    """Put back the handlers returned by :func:`install_handlers`."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
