"""Weights & Biases writer (``wandb`` section).

Offline runs work as usual with wandb: set ``WANDB_MODE=offline`` and the run is written under
``./wandb`` (or ``WANDB_DIR``) for a later ``wandb sync``.
"""
from deepscale.monitor.base import Monitor, require


class WandbMonitor(Monitor):
    """Starts one run (``project``, ``group``, ``team`` as the entity) and logs each event at its step.

    wandb requires steps to grow; events for an older step than one already logged are
    dropped by wandb with a warning.
    """

    requires = ("wandb", "wandb")
    section = "wandb"

    def __init__(self, config):
        super().__init__(config)
        self._wandb = require("wandb", "wandb", self.section)
        self.run = self._wandb.init(project=config.project, group=config.group, entity=config.team)

    def write_events(self, event_list) -> None:
        by_step = {}
        for tag, value, step in event_list:
            by_step.setdefault(step, {})[tag] = value
        for step in sorted(by_step):
            self.run.log(by_step[step], step=step)

    def close(self) -> None:
        self.run.finish()
