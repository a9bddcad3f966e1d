"""The flops profiler (DeepSpeed's ``deepspeed.profiling.flops_profiler``).

:class:`FlopsProfiler` profiles a model between ``start_profile`` and ``end_profile``;
:func:`get_model_profile` profiles one call; the ``flops_profiler`` config section makes the
engine profile one training step (see docs/profiling.md).
"""
from deepscale.profiling.flops_profiler.model_profile import get_model_profile
from deepscale.profiling.flops_profiler.profiler import (FlopsProfiler, get_module_duration, get_module_flops,
                                                         get_module_macs)
from deepscale.profiling.flops_profiler.units import (bytes_to_string, duration_to_string, flops_to_string,
                                                      macs_to_string, number_to_string, params_to_string)

__all__ = ["FlopsProfiler", "get_model_profile", "get_module_flops", "get_module_macs", "get_module_duration", "number_to_string", "macs_to_string", "flops_to_string",
           "params_to_string", "duration_to_string", "bytes_to_string"]
