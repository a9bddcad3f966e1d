"""ZeRO-Offload and ZeRO-Infinity for the optimizer: masters, gradients and states on host or NVMe.

``OptimizerOffload`` (what the ZeRO optimizers call), the settings read from the config, the swap
plan and files (``swap_plan.py``, ``swap_file.py``) and the memory planner (``planner.py``).
"""
from deepscale.runtime.offload.optimizer_offload import OptimizerOffload
from deepscale.runtime.offload.settings import OptimizerOffloadSettings, offload_settings_from_config

__all__ = ["OptimizerOffload", "OptimizerOffloadSettings", "offload_settings_from_config"]
