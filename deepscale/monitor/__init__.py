"""Training monitors: TensorBoard, CSV, Weights & Biases and Comet (DeepSpeed's ``deepspeed.monitor``).

``engine.monitor.write_events([(tag, value, step), ...])`` writes user scalars; the engine
itself writes the tags of :mod:`deepscale.monitor.tags` once per optimizer step.
"""
from deepscale.monitor.base import Monitor, MonitorPackageMissing
from deepscale.monitor.config import MonitorConfig, get_monitor_config
from deepscale.monitor.monitor import MonitorMaster
from deepscale.monitor.tags import ALL_TAGS, STEP_TAGS

__all__ = ["Monitor", "MonitorPackageMissing", "MonitorConfig", "get_monitor_config", "MonitorMaster", "ALL_TAGS",
           "STEP_TAGS"]
