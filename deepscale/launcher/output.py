"""Where a rank's output goes, and how its last lines are recovered after a failure."""
import collections
import os
import re
import sys
import threading
from typing import BinaryIO, List, Optional, Tuple

from deepscale.launcher.constants import TAIL_LINES


# Note (forwarding): a rank's pipe is read in chunks as they arrive, not line by line, and cut
# after every "\n" or "\r". A "\r"-ended piece is a line too: progress bars (tqdm) redraw with
# "\r", so waiting for "\n" would show the bar only when it ends. Each read's complete lines go
# out in one write under a lock shared by all ranks' pumps, then the stream is flushed, so two
# ranks never interleave inside a line and a terminal sees every update at once. A piece with no
# line end yet waits for the rest of its line (or the end of the stream); one longer than
# MAX_PENDING_BYTES goes out as it is, so a rank that never ends a line cannot grow our memory.
_WRITE_LOCK = threading.Lock()
MAX_PENDING_BYTES = 1 << 20
_READ_BYTES = 1 << 16
_LINE_RE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


def split_lines(pending: bytes, data: bytes) -> Tuple[List[bytes], bytes]:
    r"""Cut ``pending + data`` after every ``\n``, ``\r`` or ``\r\n``: ``(complete lines, rest)``.

    Empty ``\r`` pieces (a redraw at the start of a line, as tqdm writes) are dropped: at the
    start of a line they change nothing.
    """
    buf = pending + data
    cut = max(buf.rfind(b"\n"), buf.rfind(b"\r")) + 1
    lines = [line for line in _LINE_RE.findall(buf[:cut]) if line != b"\r"]
    return lines, buf[cut:]


class OutputTail:
    r"""Copies a rank's stdout/stderr pipes to this process's streams and keeps the last lines.

    One daemon thread per pipe. Output is forwarded as soon as a line ends with ``\n`` or
    ``\r`` (progress bars update live), whole lines at a time so ranks never interleave
    mid-line (see the Note above).

    Args:
        max_lines: lines kept for :meth:`lines`. Default ``TAIL_LINES``.
        prefix: bytes written before every forwarded line (e.g. ``b"[rank 1] "``). Default none.
    """

    def __init__(self, max_lines: int = TAIL_LINES, prefix: bytes = b""):
        self._lines = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._threads = []
        self._prefix = prefix
        self._last_was_redraw = False  # the tail's last line ended with "\r": the next one replaces it

    def attach(self, pipe: BinaryIO, target: BinaryIO) -> None:
        """Start forwarding ``pipe`` to ``target`` (a binary stream)."""
        thread = threading.Thread(target=self._pump, args=(pipe, target), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _pump(self, pipe, target):
        pending, fd = b"", pipe.fileno()
        while True:
            try:
                data = os.read(fd, _READ_BYTES)
            except OSError:
                data = b""
            lines, pending = split_lines(pending, data)
            if not data and pending:  # end of stream: the unfinished line goes out as it is
                lines, pending = lines + [pending], b""
            elif len(pending) > MAX_PENDING_BYTES:
                lines, pending = lines + [pending], b""
            if lines:
                self._remember(lines)
                self._forward(lines, target)
            if not data:
                break
        pipe.close()

    def _remember(self, lines):
        with self._lock:
            for line in lines:
                if self._last_was_redraw and self._lines:
                    self._lines.pop()  # a redrawn progress bar keeps only its latest state
                self._lines.append(line.decode("utf-8", errors="replace").rstrip("\r\n"))
                self._last_was_redraw = line.endswith(b"\r")

    def _forward(self, lines, target):
        data = b"".join(self._prefix + line for line in lines) if self._prefix else b"".join(lines)
        with _WRITE_LOCK:
            try:
                target.write(data)
                target.flush()
            except (OSError, ValueError, TypeError):
                pass  # our own stdout is gone (closed terminal); keep draining so the rank never blocks

    def join(self, timeout: float = 1.0) -> None:
        """Wait briefly for the pumps to drain after the rank exited."""
        for thread in self._threads:
            thread.join(timeout)

    def lines(self) -> List[str]:
        """The last lines seen on either stream (a progress bar counts once, at its latest state)."""
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
