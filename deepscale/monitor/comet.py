"""Comet writer (``comet`` section) over ``comet_ml``.

``online: false`` gives a ``comet_ml.OfflineExperiment`` saved as a zip for a later upload;
unset keys fall back to Comet's own configuration (environment, ``.comet.config``).
"""
from deepscale.monitor.base import Monitor, require


class CometMonitor(Monitor):
    """Logs each event as a Comet metric at its step.

    ``samples_log_interval`` thins the ``Train/Samples/*`` tags: one of them is logged only
    when at least that many samples passed since it was last logged; other tags always are.
    """

    requires = ("comet_ml", "comet_ml")
    section = "comet"

    def __init__(self, config):
        super().__init__(config)
        comet_ml = require("comet_ml", "comet_ml", self.section)
        self.interval = int(config.samples_log_interval)
        self._last_logged = {}
        experiment_config = comet_ml.ExperimentConfig(name=config.experiment_name) if config.experiment_name else None
        self.experiment = comet_ml.start(api_key=config.api_key, workspace=config.workspace, project=config.project,
                                         experiment_key=config.experiment_key, mode=config.mode, online=config.online,
                                         experiment_config=experiment_config)

    def _due(self, tag: str, step: int) -> bool:
        if not tag.startswith("Train/Samples/"):
            return True
        last = self._last_logged.get(tag)
        if last is not None and step - last < self.interval:
            return False
        self._last_logged[tag] = step
        return True

    def write_events(self, event_list) -> None:
        for tag, value, step in event_list:
            if self._due(tag, step):
                self.experiment.log_metric(tag, value, step=step)

    def close(self) -> None:
        self.experiment.end()
