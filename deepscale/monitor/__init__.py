"""Training monitors: TensorBoard, CSV, Weights & Biases and Comet (DeepSpeed's ``deepspeed.monitor``).

``engine.monitor.write_events([(tag, value, step), ...])`` writes user scalars; the engine
itself writes the tags of :mod:`deepscale.monitor.tags` once per optimizer step.
"""
import importlib

from deepscale.monitor.base import Monitor, MonitorPackageMissing
from deepscale.monitor.tags import ALL_TAGS, STEP_TAGS

# Resolved on first use: they import torch (through deepscale.comm), which `deepscale plot` and
# the other torch-free readers of this package must not need.
_LAZY = {"MonitorConfig": "deepscale.monitor.config", "get_monitor_config": "deepscale.monitor.config",
         "MonitorMaster": "deepscale.monitor.monitor"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepscale.monitor' has no attribute {name!r}")


__all__ = ["Monitor", "MonitorPackageMissing", "MonitorConfig", "get_monitor_config", "MonitorMaster", "ALL_TAGS",
           "STEP_TAGS"]
