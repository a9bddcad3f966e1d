"""TensorBoard writer (``tensorboard`` section) over ``torch.utils.tensorboard.SummaryWriter``."""
import os

from deepscale.monitor.base import Monitor, require


class TensorBoardMonitor(Monitor):
    """Writes event files under ``output_path/job_name`` (``output_path`` empty: the current directory)."""

    requires = ("tensorboard", "tensorboard")
    section = "tensorboard"

    def __init__(self, config):
        super().__init__(config)
        require("tensorboard", "tensorboard", self.section)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(config.output_path or os.getcwd(), config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, event_list) -> None:
        for tag, value, step in event_list:
            self.writer.add_scalar(tag, value, step)
        # Readable at once (and not lost by a crash) rather than at SummaryWriter's 2-minute flush.
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
