"""The scalar tags the engine writes to the monitors, one table so docs and code cannot drift.

The names follow DeepSpeed's ``Train/Samples/...`` scheme and, like DeepSpeed, use the number
of training samples seen so far (``engine.global_samples``) as the step, so curves from
both engines line up. They are written once per optimizer step, from global rank 0 only.
"""
from collections import namedtuple

Tag = namedtuple("Tag", ["name", "unit", "description", "condition"])

TRAIN_LOSS = "Train/Samples/train_loss"
LR = "Train/Samples/lr"
LOSS_SCALE = "Train/Samples/loss_scale"
GRAD_NORM = "Train/Samples/grad_norm"
SAMPLES_PER_SEC = "Train/Samples/samples_per_sec"
TOKENS_PER_SEC = "Train/Samples/tokens_per_sec"
STEP_TIME_MS = "Train/Samples/step_time_ms"
MEMORY_ALLOCATED_GB = "Train/Samples/memory_allocated_gb"
MAX_MEMORY_ALLOCATED_GB = "Train/Samples/max_memory_allocated_gb"
BREAKDOWN_PREFIX = "Train/Samples/elapsed_time_ms_"

STEP_TAGS = (
    Tag(TRAIN_LOSS, "loss", "rank 0's loss, averaged over the micro-batches of the step", "always"),
    Tag(LR, "lr", "learning rate of the first parameter group after the step", "always"),
    Tag(LOSS_SCALE, "scale", "fp16 loss scale after the step (halved there on an overflow; 1.0 without fp16)", "always"),
    Tag(GRAD_NORM, "norm", "global gradient norm before clipping", "not written for a skipped (overflow) step"),
    Tag(SAMPLES_PER_SEC, "samples/s", "train_batch_size divided by the step time", "always"),
    Tag(TOKENS_PER_SEC, "tokens/s",
        "tokens of the step (elements of the first integer tensor given to forward, summed over the "
        "micro-batches, times the data-parallel size) divided by the step time", "when forward gets an integer tensor"),
    Tag(STEP_TIME_MS, "ms", "wall-clock time since the previous optimizer step ended (the first step: since its "
        "first forward)", "always"),
    Tag(MEMORY_ALLOCATED_GB, "GB", "accelerator memory allocated now (host RSS on CPU)", "always"),
    Tag(MAX_MEMORY_ALLOCATED_GB, "GB", "peak accelerator memory allocated since the start (on CPU: host peak RSS, re-read "
        "every 10 s and raised by the current RSS in between)",
        "always"),
)

BREAKDOWN_PHASES = ("forward", "backward", "step")
BREAKDOWN_TAGS = tuple(
    Tag(BREAKDOWN_PREFIX + phase, "ms", f"time spent in {phase} during the step, summed over micro-batches",
        "wall_clock_breakdown: true") for phase in BREAKDOWN_PHASES)

ALL_TAGS = STEP_TAGS + BREAKDOWN_TAGS


def tags_markdown() -> str:
    """The tag table of docs/monitoring.md (a test checks the doc contains exactly this)."""
    lines = ["| Tag | Unit | Value | Written |", "|---|---|---|---|"]
    lines += [f"| `{t.name}` | {t.unit} | {t.description} | {t.condition} |" for t in ALL_TAGS]
    return "\n".join(lines)
