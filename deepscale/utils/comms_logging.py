"""The communication logger's records: per collective and message size, count, latency and bandwidth.

``deepscale.comm`` feeds it (see ``deepscale/comm/comms_hook.py``); this module only keeps and
summarises the numbers, so it imports nothing from the rest of deepscale.

Note: sizes and bandwidths follow nccl-tests (doc/PERFORMANCE.md). The message size ``S`` of
a call is the size of the whole logical buffer: the tensor for all_reduce/broadcast/reduce,
the gathered output for all_gather, the unscattered input for reduce_scatter, the send buffer
for all_to_all. Algorithmic bandwidth is ``S / t``; bus bandwidth multiplies it by a factor of
the group size ``n`` that makes it comparable to the link speed: all_reduce ``2(n-1)/n``;
all_gather, reduce_scatter, all_to_all, gather and scatter ``(n-1)/n``; broadcast, reduce and
point-to-point ``1``.
"""
import threading
from typing import Dict, List, Optional

# Ops whose bus bandwidth is (n-1)/n of the algorithmic bandwidth.
_RING_OPS = ("all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single",
             "gather", "scatter")


def bus_bandwidth_factor(op: str, group_size: int) -> float:
    """The nccl-tests factor turning algorithmic bandwidth into bus bandwidth for ``op``."""
    n = max(int(group_size), 1)
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in _RING_OPS:
        return (n - 1) / n
    return 1.0


def bandwidths(op: str, msg_bytes: int, seconds: float, group_size: int):
    """``(algbw, busbw)`` in GB/s (1e9 bytes per second) of one call; zeros for a zero duration."""
    if seconds <= 0:
        return 0.0, 0.0
    algbw = msg_bytes / seconds / 1e9
    return algbw, algbw * bus_bandwidth_factor(op, group_size)


def _human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.2f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024.0
    return f"{size} B"


class _Record:
    """Everything logged for one (name, message size) pair."""

    __slots__ = ("op", "group_size", "count", "latencies_ms")

    def __init__(self, op: str, group_size: int):
        self.op, self.group_size = op, group_size
        self.count = 0
        self.latencies_ms: List[float] = []


class CommsLogger:
    """Collects (op, bytes, latency) of collectives while enabled.

    Attributes mirror the ``comms_logger`` config section: ``enabled``, ``verbose`` (log every
    call as it completes), ``prof_all`` (record every op), ``prof_ops`` (the ops recorded when
    ``prof_all`` is false), ``debug`` (append the calling function to the record name).
    """

    def __init__(self):
        self.enabled = False
        self.verbose = False
        self.prof_all = True
        self.prof_ops: List[str] = []
        self.debug = False
        self._records: Dict[str, Dict[int, _Record]] = {}
        self._lock = threading.Lock()

    def configure(self, enabled=None, verbose=None, prof_all=None, prof_ops=None, debug=None) -> None:
        """Change the given settings; ``None`` keeps the current value."""
        if enabled is not None:
            self.enabled = bool(enabled)
        if verbose is not None:
            self.verbose = bool(verbose)
        if prof_all is not None:
            self.prof_all = bool(prof_all)
        if prof_ops is not None:
            if isinstance(prof_ops, str) or not all(isinstance(o, str) for o in prof_ops):
                raise TypeError(f"comms_logger.prof_ops must be a list of op names, got {prof_ops!r}")
            self.prof_ops = list(prof_ops)
        if debug is not None:
            self.debug = bool(debug)

    def wants(self, op: str, prof: bool = False) -> bool:
        """Whether a call to ``op`` is recorded (``prof=True`` forces it while enabled)."""
        return self.enabled and (prof or self.prof_all or op in self.prof_ops)

    def count(self, name: str, op: str, msg_bytes: int, group_size: int) -> _Record:
        """Count one call when it is issued; returns the record its latency goes to."""
        with self._lock:
            by_size = self._records.setdefault(name, {})
            record = by_size.get(msg_bytes)
            if record is None:
                record = by_size[msg_bytes] = _Record(op, group_size)
            record.count += 1
        return record

    def add_latency(self, record: _Record, name: str, msg_bytes: int, seconds: float, log_fn=None) -> None:
        """Attach the measured duration of one call to ``record``."""
        with self._lock:
            record.latencies_ms.append(seconds * 1e3)
        if self.verbose and log_fn is not None:
            algbw, busbw = bandwidths(record.op, msg_bytes, seconds, record.group_size)
            log_fn(f"comm op: {name} | time (ms): {seconds * 1e3:.3f} | msg size: {_human_bytes(msg_bytes)} | "
                   f"algbw (GB/s): {algbw:.3f} | busbw (GB/s): {busbw:.3f}")

    def reset(self) -> None:
        """Forget every record (the settings stay)."""
        with self._lock:
            self._records = {}

    def summary_dict(self) -> dict:
        """The raw data: ``{name: {msg_bytes: {...}}}``.

        Each entry has ``op``, ``group_size``, ``count`` (calls issued), ``latencies_ms`` (one per
        call whose completion was observed), ``total_latency_ms``, ``avg_latency_ms``,
        ``algbw_gbps`` and ``busbw_gbps`` (means over the timed calls, GB/s = 1e9 bytes/s).
        """
        out = {}
        with self._lock:
            items = [(name, dict(by_size)) for name, by_size in self._records.items()]
        for name, by_size in sorted(items):
            out[name] = {}
            for size in sorted(by_size):
                rec = by_size[size]
                lat = list(rec.latencies_ms)
                bws = [bandwidths(rec.op, size, ms / 1e3, rec.group_size) for ms in lat]
                total = sum(lat)
                out[name][size] = {
                    "op": rec.op, "group_size": rec.group_size, "count": rec.count, "latencies_ms": lat,
                    "total_latency_ms": total, "avg_latency_ms": total / len(lat) if lat else 0.0,
                    "algbw_gbps": sum(b[0] for b in bws) / len(bws) if bws else 0.0,
                    "busbw_gbps": sum(b[1] for b in bws) / len(bws) if bws else 0.0,
                }
        return out

    @staticmethod
    def format_summary(summary: dict, straggler_ms: Optional[dict] = None) -> str:
        """A table of ``summary_dict()``; ``straggler_ms[name][size]`` adds a straggler column."""
        header = (f"{'Comm. Op':<28}{'Message Size':>14}{'Count':>8}{'Total Latency(ms)':>19}"
                  f"{'Avg Latency(ms)':>17}{'algbw (GB/s)':>14}{'busbw (GB/s)':>14}")
        if straggler_ms is not None:
            header += f"{'Straggler(ms)':>15}"
        lines = [header]
        for name, by_size in summary.items():
            lines.append(name)
            for size, row in by_size.items():
                line = (f"{'':<28}{_human_bytes(size):>14}{row['count']:>8}{row['total_latency_ms']:>19.3f}"
                        f"{row['avg_latency_ms']:>17.3f}{row['algbw_gbps']:>14.3f}{row['busbw_gbps']:>14.3f}")
                if straggler_ms is not None:
                    line += f"{straggler_ms.get(name, {}).get(size, 0.0):>15.3f}"
                lines.append(line)
        return "\n".join(lines)
