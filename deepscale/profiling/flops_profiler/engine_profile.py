"""The ``flops_profiler`` config section inside the engine: profile one optimizer step.

At ``profile_step`` (the optimizer step count when its first forward starts, as DeepSpeed) on
global rank 0, every micro-batch's forward and backward is counted and timed, the optimizer
step is timed, and the report is printed (or written to ``output_file``) after the step; then
everything is removed. Other ranks and other steps pay one integer comparison per phase.
"""
import contextlib
import time

from deepscale.accelerator import get_accelerator
from deepscale.profiling.flops_profiler.peak import current_device_name, peak_flops
from deepscale.profiling.flops_profiler.profiler import FlopsProfiler
from deepscale.runtime.step_metrics import count_tokens
from deepscale.utils.logging import log_dist

_COUNTED_PHASES = ("forward", "backward")


class EngineFlopsProfile:
    """Runs a :class:`FlopsProfiler` over the engine's ``profile_step``.

    Args:
        engine: the engine (module, counters, batch sizes, model dtype).
        config: its ``FlopsProfilerConfig``.

    ``last_profile`` holds the figures of the profiled step once it is printed (a dict), so
    they stay readable after the profiler's own results are dropped.
    """

    def __init__(self, engine, config):
        self._engine = engine
        self._config = config
        self.profiler = FlopsProfiler(engine.module, engine, config.recompute_fwd_factor)
        self._timings = None
        self.last_profile = None

    def _due(self) -> bool:
        engine = self._engine
        return engine.global_steps == self._config.profile_step and engine.global_rank == 0

    @contextlib.contextmanager
    def phase(self, name: str, inputs=None):
        """Count (forward, backward) and time (all three) engine phase ``name`` when it is due."""
        if not self._due():
            yield
            return
        if name == "forward" and not self.profiler.started:
            self.profiler.start_profile()
            self._timings = {"forward": 0.0, "backward": 0.0, "step": 0.0, "micro_batches": 0, "tokens": 0}
        if not self.profiler.started:  # a backward or step with no profiled forward before it
            yield
            return
        if name == "forward":
            self._timings["micro_batches"] += 1
            self._timings["tokens"] += count_tokens(*inputs) if inputs is not None else 0
        counting = name in _COUNTED_PHASES
        synchronize = get_accelerator().synchronize
        synchronize()
        start = time.perf_counter()
        if counting:
            self.profiler.resume_profile()
        self.profiler.in_backward_scope = name == "backward"
        try:
            yield
        finally:
            self.profiler.in_backward_scope = False
            if counting:
                self.profiler.pause_profile()
            synchronize()
            self._timings[name] += time.perf_counter() - start

    def after_step(self) -> None:
        """Print the report of the profiled step (if one was profiled) and remove the profiler."""
        if not self.profiler.started:
            return
        engine, config, prof = self._engine, self._config, self.profiler
        timings = dict(self._timings, samples=engine.train_batch_size(),
                       tokens=self._timings["tokens"] * engine.dp_world_size,
                       peak_flops=peak_flops(current_device_name(), engine.model_dtype))
        prof.engine_timings = timings
        try:
            prof.print_model_profile(profile_step=config.profile_step, module_depth=config.module_depth,
                                     top_modules=config.top_modules, detailed=config.detailed,
                                     output_file=config.output_file)
            self.last_profile = self._summary(timings)
        finally:
            prof.end_profile()
        log_dist(f"flops profiler: step {config.profile_step}: {self.last_profile['model_tflops']:.4g} model TFLOPS "
                 f"per GPU, {self.last_profile['training_flops']:.4g} flops per GPU"
                 + (f", MFU {100 * self.last_profile['mfu']:.3g}%" if self.last_profile["mfu"] is not None else ""),
                 ranks=[0])

    def _summary(self, timings) -> dict:
        prof = self.profiler
        iteration = timings["forward"] + timings["backward"] + timings["step"]
        model_flops = prof.get_training_flops(include_recompute=False)
        rate = model_flops / iteration if iteration else 0.0
        return {"params": prof.get_total_params(), "phases": prof.get_flops_by_phase(),
                "training_flops": model_flops, "hardware_flops": prof.get_training_flops(),
                "latency_s": {k: timings[k] for k in ("forward", "backward", "step")}, "iter_latency_s": iteration,
                "model_tflops": rate / 1e12, "mfu": rate / timings["peak_flops"] if timings["peak_flops"] else None,
                "samples_per_s": timings["samples"] / iteration if iteration else 0.0,
                "tokens_per_s": timings["tokens"] / iteration if iteration else 0.0,
                "micro_batches": timings["micro_batches"]}
