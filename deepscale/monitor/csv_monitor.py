"""CSV writer (``csv_monitor`` section): one ``<tag>.csv`` per tag under ``output_path/job_name``.

The layout matches DeepSpeed's CSV monitor: the file name is the tag with ``/`` and spaces
replaced by ``_`` (``Train_Samples_train_loss.csv``) and the columns are ``step`` and the last
part of the tag. Files are appended to, so a resumed run continues its curves.
"""
import csv
import os

from deepscale.monitor.base import Monitor


def csv_file_name(tag: str) -> str:
    """The file a tag is written to."""
    return tag.replace("/", "_").replace(" ", "_") + ".csv"


class CSVMonitor(Monitor):
    """Appends ``step,value`` rows; files stay open and are flushed after each batch of events."""

    section = "csv_monitor"

    def __init__(self, config):
        super().__init__(config)
        self.log_dir = os.path.join(config.output_path or os.getcwd(), config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self._files = {}

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
        self.flush()

    def flush(self) -> None:
        for handle, _ in self._files.values():
            handle.flush()

    def close(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files = {}
