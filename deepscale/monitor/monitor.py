"""``MonitorMaster``: fans events out to every enabled monitor, on global rank 0 only."""
from deepscale import comm as dist
from deepscale.monitor.comet import CometMonitor
from deepscale.monitor.config import get_monitor_config
from deepscale.monitor.csv_monitor import CSVMonitor
from deepscale.monitor.tensorboard import TensorBoardMonitor
from deepscale.monitor.wandb import WandbMonitor

_WRITERS = (("tensorboard", TensorBoardMonitor), ("wandb", WandbMonitor), ("csv_monitor", CSVMonitor),
            ("comet", CometMonitor))


def _check_event(event) -> None:
    if not (isinstance(event, (tuple, list)) and len(event) == 3 and isinstance(event[0], str)):
        raise TypeError(f"write_events: each event must be a (tag: str, value, step: int) tuple, got {event!r}")


class MonitorMaster:
    """Every enabled monitor of a config behind one ``write_events``.

    Args:
        monitor_config: a config dict, a parsed ``DeepScaleConfig`` or a ``MonitorConfig``.

    Every rank checks that the enabled monitors' libraries are installed (so a missing
    package fails everywhere instead of hanging the other ranks); only global rank 0
    creates writers and writes. On other ranks ``write_events`` does nothing.
    """

    def __init__(self, monitor_config):
        self.config = get_monitor_config(monitor_config)
        self.enabled = self.config.enabled
        self.monitors = []
        enabled = [(name, cls) for name, cls in _WRITERS if getattr(self.config, name).enabled]
        for _, cls in enabled:
            cls.check_installed()
        if dist.get_rank() == 0:
            self.monitors = [cls(getattr(self.config, name)) for name, cls in enabled]

    @property
    def writes(self) -> bool:
        """True on the rank that writes (rank 0) when at least one monitor is enabled."""
        return bool(self.monitors)

    def write_events(self, event_list) -> None:
        """Write ``[(tag, value, step), ...]`` to every enabled monitor (rank 0 only).

        Values are converted with ``float``; a tensor value is read from the device here.
        """
        if not self.monitors:
            return
        events = []
        for event in event_list:
            _check_event(event)
            events.append((event[0], float(event[1]), int(event[2])))
        for monitor in self.monitors:
            monitor.write_events(events)

    def flush(self) -> None:
        for monitor in self.monitors:
            monitor.flush()

    def close(self) -> None:
        """Close every writer (files, runs); later events are dropped."""
        for monitor in self.monitors:
            monitor.close()
        self.monitors = []
