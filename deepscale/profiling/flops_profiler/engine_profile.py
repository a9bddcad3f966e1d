"""The ``flops_profiler`` config section inside the engine: profile one optimizer step.

On global rank 0 (as DeepSpeed), the optimizer step that starts at ``global_steps ==
profile_step`` is counted: every micro-batch's forward and backward runs under the profiler.
The next step is timed without it (forward, backward and optimizer step, synchronised), so
latencies, FLOPS and MFU are not inflated by the profiler's own per-operator cost; the report
is printed (or written to ``output_file``) after that step, and everything is removed. If
training stops first, ``engine.destroy()`` prints it with the profiled step's latencies and
says so. Other ranks and other steps pay one integer comparison per phase.
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
        self._counted = None  # phase times and batch counts of the profiled step
        self._timed = None  # phase times of the step after it
        self.last_profile = None

    def _step_role(self):
        """``"count"`` in the profiled step, ``"time"`` in the one after, else None."""
        engine = self._engine
        if engine.global_rank != 0:
            return None
        if engine.global_steps == self._config.profile_step:
            return "count"
        if engine.global_steps == self._config.profile_step + 1 and self._counted is not None:
            return "time"
        return None

    @staticmethod
    def _new_timings():
        return {"forward": 0.0, "backward": 0.0, "step": 0.0, "micro_batches": 0, "tokens": 0}

    @contextlib.contextmanager
    def phase(self, name: str, inputs=None):
        """Count (forward, backward) and time engine phase ``name`` in the steps it is due."""
        role = self._step_role()
        if role is None:
            yield
            return
        if role == "count" and name == "forward" and not self.profiler.started:
            self.profiler.start_profile()
            self._counted = self._new_timings()
        if role == "time" and self._timed is None:
            self._timed = self._new_timings()
        timings = self._counted if role == "count" else self._timed
        if timings is None:  # a backward or step with no profiled forward before it
            yield
            return
        if name == "forward":
            timings["micro_batches"] += 1
            timings["tokens"] += count_tokens(*inputs) if inputs is not None else 0
        counting = role == "count" and name in _COUNTED_PHASES
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
            timings[name] += time.perf_counter() - start

    def after_step(self) -> None:
        """After the profiled step: stop counting. After the next one: print and remove the profiler."""
        if not self.profiler.started:
            return
        if self._timed is None:
            self.profiler.stop_profile()  # counts kept; hooks and the dispatch mode removed
            return
        self._report(self._timed, f"step {self._config.profile_step + 1}, not profiled")

    def close(self) -> None:
        """Report a profiled step whose timing step never came (training stopped), then clean up."""
        if self.profiler.started:
            self._report(self._counted, f"step {self._config.profile_step}, while profiled (includes the "
                                        f"profiler's cost; training stopped before the next step)")

    def _report(self, step_timings, latency_source: str) -> None:
        engine, config, prof = self._engine, self._config, self.profiler
        counted = self._counted
        timings = dict(step_timings, micro_batches=counted["micro_batches"], samples=engine.train_batch_size(),
                       tokens=counted["tokens"] * engine.dp_world_size, latency_source=latency_source,
                       peak_flops=peak_flops(current_device_name(), engine.model_dtype))
        prof.engine_timings = timings
        try:
            prof.print_model_profile(profile_step=config.profile_step, module_depth=config.module_depth,
                                     top_modules=config.top_modules, detailed=config.detailed,
                                     output_file=config.output_file)
            self.last_profile = self._summary(timings)
        finally:
            prof.end_profile()
            self._counted = self._timed = None
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
                "all_flops": prof.get_training_flops(include_other=True),
                "latency_s": {k: timings[k] for k in ("forward", "backward", "step")}, "iter_latency_s": iteration,
                "model_tflops": rate / 1e12, "mfu": rate / timings["peak_flops"] if timings["peak_flops"] else None,
                "samples_per_s": timings["samples"] / iteration if iteration else 0.0,
                "tokens_per_s": timings["tokens"] / iteration if iteration else 0.0,
                "micro_batches": timings["micro_batches"], "latency_source": timings["latency_source"]}
