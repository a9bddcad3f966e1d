"""CSV writer (``csv_monitor`` section): one ``<tag>.csv`` per tag under ``output_path/job_name``.

The layout matches DeepSpeed's CSV monitor: the file name is the tag with ``/`` and spaces
replaced by ``_`` (``Train_Samples_train_loss.csv``) and the columns are ``step`` and the last
part of the tag. Files are appended to, so a resumed run continues its curves.
"""
import csv
import os
import time

from deepscale.monitor.base import Monitor

# Files are flushed at most this often (seconds) and at flush()/close(): a flush per step is a
# write system call per tag, a measurable share of a small step's time.
_FLUSH_S = 1.0


def csv_file_name(tag: str) -> str:
    """The file a tag is written to."""
    return tag.replace("/", "_").replace(" ", "_") + ".csv"


class CSVMonitor(Monitor):
    """Appends ``step,value`` rows; files stay open and are flushed every second and at ``close()``."""

    section = "csv_monitor"

    def __init__(self, config):
        super().__init__(config)
        self.log_dir = os.path.join(config.output_path or os.getcwd(), config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self._files = {}
        self._last_flush = time.monotonic()

    def _writer(self, tag: str):
        entry = self._files.get(tag)
        if entry is None:
            path = os.path.join(self.log_dir, csv_file_name(tag))
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            handle = open(path, "a", newline="")
            entry = self._files[tag] = (handle, csv.writer(handle))
            if new:
                entry[1].writerow(["step", tag.rsplit("/", 1)[-1]])
        return entry[1]

    def write_events(self, event_list) -> None:
        for tag, value, step in event_list:
            self._writer(tag).writerow([step, value])
        if time.monotonic() - self._last_flush >= _FLUSH_S:
            self.flush()

    def flush(self) -> None:
        for handle, _ in self._files.values():
            handle.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files = {}
