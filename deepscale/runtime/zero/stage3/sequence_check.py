"""Every ZeRO-3 all-gather, and the end of every forward and backward, first checks that all ranks
are about to do the same thing.

Note: the check (always on). Each rank folds what it is about to do (collective kind,
parameter-group index, element count) into a running 62-bit digest and all-reduces ``[digest,
-digest]`` with MAX: one latency-bound collective of 16 bytes (about 0.5 ms on gloo with 2
ranks), and the ranks agree exactly when the maximum equals the minimum. The digest covers the
whole sequence so far, so a rank that skipped something is caught at its next check. On a
mismatch the ranks exchange readable descriptions and raise :class:`CollectiveDesyncError`
naming the module and parameters each rank was about to communicate. Because the check comes
before the collective it guards, ranks that take different branches get this error within
milliseconds instead of hanging inside gloo (different sizes) or silently training on weights
mixed from both branches (equal sizes). The ends of forward and backward are checked the same
way, so a rank that finishes while another still gathers is caught too.

What is checked: all-gathers, whose order follows the modules each rank runs, and the phase
boundaries. Reduce-scatters run on their own process group in an order that does not depend on
the rank (``coordinator.py``), so they need no check; ``stage3_debug_sequence_check`` (or
``DEEPSCALE_ZERO3_DEBUG=1``) checks them as well, on that group.
"""
import os
from dataclasses import dataclass

import torch

from deepscale import comm as dist

DEBUG_ENV = "DEEPSCALE_ZERO3_DEBUG"
_KIND_IDS = {"all_gather": 1, "reduce_scatter": 2, "broadcast": 3, "all_reduce": 4, "end_forward": 5,
             "end_backward": 6}
_MASK = (1 << 62) - 1
_MIX = 0x9E3779B97F4A7C15


def debug_enabled_from_env() -> bool:
    """True when ``DEEPSCALE_ZERO3_DEBUG`` is set to 1/true/yes/on."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class CollectiveDesyncError(RuntimeError):
    """Ranks were about to issue different ZeRO-3 collectives."""


@dataclass
class CollectiveInfo:
    """What one collective communicates (for the sequence check, the watchdog and errors).

    Attributes:
        kind: ``all_gather``, ``reduce_scatter``, ``broadcast`` or ``all_reduce``.
        group_index: the parameter group's index (-1 for other collectives).
        modules: names of the modules whose parameters travel.
        params: names of the parameters (possibly shortened).
        numel: elements sent by this rank.
        step: the optimizer step the collective belongs to.
    """

    kind: str
    group_index: int
    modules: str
    params: str
    numel: int
    step: int = 0

    def describe(self) -> str:
        if self.group_index < 0:  # a phase boundary, checked so a rank that issues nothing more is caught
            return f"{self.kind.replace('_', ' of ')} (last module: {self.modules}) at step {self.step}"
        return (f"{self.kind} of parameter group {self.group_index} (module(s): {self.modules}; parameter(s): "
                f"{self.params}; {self.numel} elements) at step {self.step}")

    def label(self) -> str:
        """The short form the collective watchdog reports."""
        if self.group_index < 0:
            return f"ZeRO-3 {self.kind.replace('_', ' of ')}"
        return f"ZeRO-3 {self.kind} of parameter group {self.group_index}: {self.modules}"


class SequenceChecker:
    """Checks that all ranks of ``group`` issue the same collective sequence (see the module Note).

    Args:
        group: the process group the guarded collectives use (None: the default group).
        world_size: ranks in ``group``.
    """

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, world_size
        self.sequence = 0
        self.digest = 0
        self._buffer = torch.zeros(2, dtype=torch.int64)

    def check(self, info: CollectiveInfo) -> None:
        """Raise :class:`CollectiveDesyncError` when another rank is about to do something else."""
        self.sequence += 1
        if self.world_size == 1:
            return
        value = (self.digest * _MIX + hash((_KIND_IDS.get(info.kind, 0), info.group_index, info.numel))) & _MASK
        self.digest = value
        buffer = self._buffer
        buffer[0], buffer[1] = value, -value
        with dist.collective_label(lambda: f"ZeRO-3 sequence check before {info.describe()}"):
            dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self.group)
        if int(buffer[0]) == value and int(buffer[1]) == -value:
            return
        described = [None] * self.world_size
        dist.all_gather_object(described, info.describe(), group=self.group)
        lines = "\n".join(f"  rank {rank}: {text}" for rank, text in enumerate(described))
        raise CollectiveDesyncError(f"ZeRO-3 ranks diverged at collective #{self.sequence}: they are about to "
                                    f"communicate different parameters (a data-dependent branch or a skipped "
                                    f"forward/backward on some rank?):\n{lines}")
