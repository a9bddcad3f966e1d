"""Per-step logging: the ``steps_per_print`` line, the ``wall_clock_breakdown`` timers, the
monitors (TensorBoard, CSV, W&B, Comet), ``memory_breakdown`` and the comms logger set-up."""
import torch

from deepscale import comm as dist
from deepscale.accelerator import get_accelerator
from deepscale.monitor import MonitorMaster
from deepscale.runtime.step_metrics import StepMetrics
from deepscale.runtime.utils import see_memory_usage
from deepscale.utils.logging import log_dist
from deepscale.utils.timer import ThroughputMeter, Timers

_TIMED_PHASES = ("forward", "backward", "step")


class StepReporter:
    """Collects the loss and timings of each step and logs them on rank 0 every N steps.

    Args:
        config: the engine config (``steps_per_print``, ``wall_clock_breakdown``,
            ``memory_breakdown``, the monitor sections and ``comms_logger``).
        engine: read for step counters, batch size and learning rate.

    The monitors get the events of every optimizer step (``deepscale.monitor.tags``) on rank 0.
    """

    def __init__(self, config, engine):
        self._engine = engine
        self._every = int(config.steps_per_print or 0)
        self._breakdown = bool(config.wall_clock_breakdown)
        self._timers = Timers(get_accelerator().synchronize) if self._breakdown else None
        self._throughput = ThroughputMeter()
        self._loss_sum = None
        self._loss_count = 0
        self._memory_breakdown = bool(getattr(config, "memory_breakdown", False))
        comms = getattr(config, "comms_logger", None)
        if comms is not None and comms.enabled:
            dist.configure(config)
        self.monitor = MonitorMaster(config)
        # Only the writing rank pays for the per-step events (they read the loss on the host).
        self._metrics = StepMetrics(engine, self._timers) if self.monitor.writes else None

    def start(self, phase: str, inputs=None) -> None:
        """Start timing ``phase``; ``inputs`` = forward's ``(args, kwargs)`` (counted for tokens/s)."""
        if self._metrics is not None and inputs is not None:
            self._metrics.on_forward(*inputs)
        if self._timers is not None:
            self._timers(phase).start()

    def stop(self, phase: str) -> None:
        if self._timers is not None:
            self._timers(phase).stop()
        if self._memory_breakdown:
            see_memory_usage(f"after {phase} (micro step {self._engine.micro_steps})", force=True)

    def record_loss(self, loss: torch.Tensor) -> None:
        # Kept on the device; read on the host only when a line is printed.
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1
        if self._metrics is not None:
            self._metrics.on_loss(loss)

    def after_step(self) -> None:
        engine = self._engine
        self._throughput.add(engine.train_batch_size())
        if self._metrics is not None:
            self.monitor.write_events(self._metrics.step_events())
        if self._every <= 0 or engine.global_steps % self._every != 0:
            return
        loss = float(self._loss_sum) / max(self._loss_count, 1) if self._loss_sum is not None else float("nan")
        self._loss_sum, self._loss_count = None, 0
        lrs = ", ".join(f"{lr:.3e}" for lr in engine.get_lr())
        line = (f"step={engine.global_steps} loss={loss:.4f} lr=[{lrs}] "
                f"samples/s={self._throughput.report():.2f} skipped={engine.skipped_steps}")
        if engine.fp16_enabled():
            line += f" loss_scale={engine.loss_scale:g}"
        log_dist(line, ranks=[0])
        if self._timers is not None:
            log_dist("time (ms) per step | " + self._timers.summary(_TIMED_PHASES, normalizer=self._every),
                     ranks=[0])
            if self._metrics is not None:
                self._metrics.timers_reset()

    def close(self) -> None:
        """Close the monitors' files and runs."""
        self.monitor.close()
