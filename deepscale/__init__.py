"""deepscale: a PyTorch training engine with DeepSpeed-compatible configs and calls.

Typical use::

    engine, optimizer, loader, scheduler = deepscale.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")

Attributes are resolved lazily so that ``import deepscale`` (and the ``deepscale``
launcher) does not import torch until something needs it.
"""
import importlib

from deepscale.version import __version__

_LAZY_ATTRIBUTES = {
    "initialize": "deepscale.runtime.initialize",
    "init_distributed": "deepscale.comm.comm",
    "add_config_arguments": "deepscale.launcher.config_arguments",
    "DeepScaleEngine": "deepscale.runtime.engine",
    "DeepScaleConfig": "deepscale.config",
    # DeepSpeed's names for the same classes (integrations import them from the top level).
    "DeepSpeedEngine": "deepscale.runtime.engine",
    "DeepSpeedConfig": "deepscale.runtime.config",
    "tp_model_init": "deepscale.runtime.model_parallel_setup",
}
_LAZY_NAMES = {"DeepScaleEngine": "Engine", "DeepSpeedEngine": "Engine"}
# Only packages that exist: a name here that fails to import would turn a clear AttributeError
# into a confusing ModuleNotFoundError (tests/unit/test_package_surface.py imports each one).
_LAZY_SUBMODULES = ("accelerator", "comm", "config", "ops", "runtime", "utils", "launcher", "zero", "checkpoint",
                    "moe", "compat", "checkpointing", "parallel", "monitor", "profiling", "pipe", "sequence")

__all__ = ["__version__", "initialize", "init_distributed", "add_config_arguments"]


def __getattr__(name):
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(_LAZY_ATTRIBUTES[name])
        value = getattr(module, _LAZY_NAMES.get(name, name))
        globals()[name] = value
        return value
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"deepscale.{name}")
    raise AttributeError(f"module 'deepscale' has no attribute {name!r}")
