"""The monitor events of one optimizer step (the tags of ``deepscale.monitor.tags``)."""
import time

import torch

from deepscale.accelerator import get_accelerator
from deepscale.monitor import tags

_GB = float(1 << 30)
# On CPU the peak RSS comes from getrusage, which walks every thread of the process and took
# 3 ms per call on a busy 2-core machine; it is re-read at most this often (seconds) and
# combined with the current RSS, read every step, in between.
_CPU_PEAK_REFRESH_S = 10.0


def count_tokens(args, kwargs) -> int:
    """Elements of the first integer tensor among the forward inputs (token ids), else 0."""
    for value in list(args) + list(kwargs.values()):
        if torch.is_tensor(value) and not value.is_floating_point() and not value.is_complex() \
                and value.dtype != torch.bool:
            return value.numel()
    return 0


class StepMetrics:
    """Accumulates the loss and tokens of the current step and turns them into monitor events.

    Args:
        engine: read for counters, batch size, lr, loss scale and grad norm.
        timers: the ``wall_clock_breakdown`` timers, or None.
    """

    def __init__(self, engine, timers=None):
        self._engine = engine
        self._timers = timers
        self._timer_seen = {phase: 0.0 for phase in tags.BREAKDOWN_PHASES}
        self._step_start = None
        self._loss_sum = None
        self._loss_count = 0
        self._tokens = 0
        self._cpu_peak, self._cpu_peak_read_at = 0, None

    def _memory_gb(self):
        """(allocated now, peak allocated) in GB."""
        accel = get_accelerator()
        current = accel.memory_allocated()
        if accel.device_name() != "cpu":
            return current / _GB, accel.max_memory_allocated() / _GB
        now = time.monotonic()
        if self._cpu_peak_read_at is None or now - self._cpu_peak_read_at >= _CPU_PEAK_REFRESH_S:
            self._cpu_peak, self._cpu_peak_read_at = accel.max_memory_allocated(), now
        self._cpu_peak = max(self._cpu_peak, current)
        return current / _GB, self._cpu_peak / _GB

    def on_forward(self, args, kwargs) -> None:
        if self._step_start is None:
            self._step_start = time.perf_counter()
        self._tokens += count_tokens(args, kwargs)

    def on_loss(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def timers_reset(self) -> None:
        """The breakdown timers were read and reset (by the steps_per_print line)."""
        self._timer_seen = dict.fromkeys(self._timer_seen, 0.0)

    def step_events(self) -> list:
        """The events of the step that just ended; resets the per-step accumulators."""
        engine = self._engine
        step = engine.global_samples
        loss = float(self._loss_sum) / self._loss_count if self._loss_sum is not None else float("nan")
        now = time.perf_counter()
        seconds = now - self._step_start if self._step_start is not None else 0.0
        tokens = self._tokens * engine.dp_world_size
        self._step_start, self._loss_sum, self._loss_count, self._tokens = now, None, 0, 0
        events = [(tags.TRAIN_LOSS, loss, step), (tags.LR, engine.get_lr()[0], step),
                  (tags.LOSS_SCALE, float(engine.loss_scale), step)]
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            events.append((tags.GRAD_NORM, float(grad_norm), step))
        if seconds > 0:
            events.append((tags.SAMPLES_PER_SEC, engine.train_batch_size() / seconds, step))
            if tokens:
                events.append((tags.TOKENS_PER_SEC, tokens / seconds, step))
        allocated, peak = self._memory_gb()
        events += [(tags.STEP_TIME_MS, seconds * 1e3, step), (tags.MEMORY_ALLOCATED_GB, allocated, step),
                   (tags.MAX_MEMORY_ALLOCATED_GB, peak, step)]
        if self._timers is not None:
            for phase in tags.BREAKDOWN_PHASES:
                total = self._timers(phase).elapsed_total
                events.append((tags.BREAKDOWN_PREFIX + phase, (total - self._timer_seen[phase]) * 1e3, step))
                self._timer_seen[phase] = total
        return events
