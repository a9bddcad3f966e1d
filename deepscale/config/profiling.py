"""Measurement sections: ``flops_profiler``, ``comms_logger``, ``timers`` and ``collective_watchdog``."""
from typing import List, Optional

from pydantic import Field

from deepscale.config.base import ConfigSection
from deepscale.config.fields import Bool, Float, Int, Str, choice


class FlopsProfilerConfig(ConfigSection):
    """``flops_profiler``: profile one step and print per-module FLOPs and latency."""

    enabled: Bool = False
    recompute_fwd_factor: Float = Field(0.0, ge=0.0)
    profile_step: Int = Field(1, ge=1)
    module_depth: Int = -1
    top_modules: Int = Field(1, ge=1)
    detailed: Bool = True
    output_file: Optional[Str] = None


class CommsLoggerConfig(ConfigSection):
    """``comms_logger``: record the size and latency of collective calls."""

    enabled: Bool = False
    verbose: Bool = False
    prof_all: Bool = True
    debug: Bool = False
    prof_ops: List[str] = Field(default_factory=list)


class CollectiveWatchdogConfig(ConfigSection):
    """``collective_watchdog`` (a deepscale addition; DeepSpeed has no such section): report every
    collective that waits longer than ``timeout`` seconds (0: off), naming it, the step and what
    each rank last did; ``action: "abort"`` then exits the process. ``DEEPSCALE_WATCHDOG_TIMEOUT``
    and ``DEEPSCALE_WATCHDOG_ACTION`` override both. See docs/zero3.md ("No hidden hangs")."""

    timeout: Float = Field(300.0, ge=0.0)
    action: choice("log", "abort") = "log"


class ThroughputTimerConfig(ConfigSection):
    """``timers.throughput``."""

    enabled: Bool = True
    synchronized: Bool = True


class TimersConfig(ConfigSection):
    """``timers``: the samples/second timer; ``synchronized`` waits for the device
    before reading the clock (accurate, slightly slower)."""

    throughput: ThroughputTimerConfig = Field(default_factory=ThroughputTimerConfig)
