"""Named wall-clock timers and a throughput meter for step-time breakdowns."""
import time
from typing import Callable, Dict, Optional


class _Timer:
    def __init__(self, name: str, synchronize: Optional[Callable[[], None]]):
        self.name = name
        self._sync = synchronize
        self._start = None
        self.elapsed_total = 0.0
        self.count = 0

    def start(self) -> None:
        if self._start is not None:
            raise RuntimeError(f"timer {self.name!r} started twice without stop()")
        if self._sync:
            self._sync()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is None:
            raise RuntimeError(f"timer {self.name!r} stopped without start()")
        if self._sync:
            self._sync()
        self.elapsed_total += time.perf_counter() - self._start
        self.count += 1
        self._start = None

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated since the last reset."""
        value = self.elapsed_total
        if reset:
            self.elapsed_total, self.count = 0.0, 0
        return value


class Timers:
    """A set of named timers, created on first use: ``timers('forward').start()``.

    Args:
        synchronize: called before reading the clock so device work is included (e.g. the
            accelerator's ``synchronize``); None skips it.
    """

    def __init__(self, synchronize: Optional[Callable[[], None]] = None):
        self._sync = synchronize
        self._timers: Dict[str, _Timer] = {}

    def __call__(self, name: str) -> _Timer:
        if name not in self._timers:
            self._timers[name] = _Timer(name, self._sync)
        return self._timers[name]

    def summary(self, names, normalizer: float = 1.0, reset: bool = True) -> str:
        """``name: ms`` pairs for the given timers, divided by ``normalizer``."""
        parts = []
        for name in names:
            if name in self._timers:
                parts.append(f"{name}: {self._timers[name].elapsed(reset) * 1000.0 / normalizer:.2f}ms")
        return " | ".join(parts)


class ThroughputMeter:
    """Samples per second between successive ``report()`` calls."""

    def __init__(self):
        self._last_time = time.perf_counter()
        self._samples = 0

    def add(self, num_samples: int) -> None:
        self._samples += num_samples

    def report(self) -> float:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        rate = self._samples / elapsed
        self._last_time, self._samples = now, 0
        return rate
