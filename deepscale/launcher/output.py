"""Where a rank's output goes, and how its last lines are recovered after a failure."""
import collections
import os
import sys
import threading
from typing import BinaryIO, List, Optional

from deepscale.launcher.constants import TAIL_LINES


class OutputTail:
    """Copies a rank's stdout/stderr pipes to this process's streams and keeps the last lines.

    One daemon thread per pipe; whole lines are forwarded so ranks do not interleave mid-line.

    Args:
        max_lines: lines kept for :meth:`lines`. Default ``TAIL_LINES``.
    """

    def __init__(self, max_lines: int = TAIL_LINES):
        self._lines = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._threads = []

    def attach(self, pipe: BinaryIO, target: BinaryIO) -> None:
        """Start forwarding ``pipe`` to ``target`` (a binary stream)."""
        thread = threading.Thread(target=self._pump, args=(pipe, target), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _pump(self, pipe, target):
        for line in iter(pipe.readline, b""):
            with self._lock:
                self._lines.append(line.decode("utf-8", errors="replace").rstrip("\n"))
            try:
                target.write(line)
                target.flush()
            except (OSError, ValueError, TypeError):
                pass  # our own stdout is gone (closed terminal); keep draining so the rank never blocks
        pipe.close()

    def join(self, timeout: float = 1.0) -> None:
        """Wait briefly for the pumps to drain after the rank exited."""
        for thread in self._threads:
            thread.join(timeout)

    def lines(self) -> List[str]:
        """The last lines seen on either stream."""
        with self._lock:
            return list(self._lines)


def tail_file(path: str, max_lines: int = TAIL_LINES, max_bytes: int = 65536) -> List[str]:
    """The last ``max_lines`` lines of a log file (empty when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-max_lines:]


def stdout_buffer() -> BinaryIO:
    """This process's stdout as a binary stream."""
    return getattr(sys.stdout, "buffer", sys.stdout)


def stderr_buffer() -> BinaryIO:
    """This process's stderr as a binary stream."""
    return getattr(sys.stderr, "buffer", sys.stderr)


def format_tail(lines: Optional[List[str]], indent: str = "    ") -> str:
    """Indented block of a rank's last lines for an error message."""
    if not lines:
        return f"{indent}(no output captured)"
    return "\n".join(indent + line for line in lines)
