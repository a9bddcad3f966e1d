"""Profiling tools: the flops profiler (DeepSpeed's ``deepspeed.profiling``).

``deepscale.profiling.flops_profiler`` holds :class:`FlopsProfiler` and ``get_model_profile``;
the communication logger lives with the collectives (``deepscale.comm``).
"""
import importlib


def __getattr__(name):
    if name == "flops_profiler":
        return importlib.import_module("deepscale.profiling.flops_profiler")
    raise AttributeError(f"module 'deepscale.profiling' has no attribute {name!r}")


__all__ = ["flops_profiler"]
