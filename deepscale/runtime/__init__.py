"""The training runtime: engine, precision, optimizers, ZeRO, checkpoints, pipeline.

Submodules are importable as attributes (``deepscale.runtime.lr_schedules``) without an explicit
import, as DeepSpeed clients expect (``deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES``).
"""
import importlib


def __getattr__(name):
    if name.startswith("_"):
        raise AttributeError(f"module 'deepscale.runtime' has no attribute {name!r}")
    try:
        return importlib.import_module(f"deepscale.runtime.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"deepscale.runtime.{name}":
            raise
        raise AttributeError(f"module 'deepscale.runtime' has no attribute {name!r}") from None
