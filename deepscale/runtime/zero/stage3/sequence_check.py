"""Debug mode: every ZeRO-3 collective first checks that all ranks issue the same one.

Note: the check. Before each all-gather or reduce-scatter, every rank contributes four
integers (sequence number, collective kind, parameter-group index, element count) to one
small all-gather. If the rows differ, ranks have diverged (for example a data-dependent branch
ran different modules on different ranks); the ranks then exchange readable descriptions and
raise :class:`CollectiveDesyncError` naming the module and parameters each rank was about to
communicate. The ends of forward and backward are checked the same way, so a rank that
finishes while another still gathers is caught too. Without the check such a divergence
hangs or, worse, silently mixes shards of equally sized groups. The check costs one latency-bound collective per collective, so it is
off unless ``zero_optimization.stage3_debug_sequence_check`` or ``DEEPSCALE_ZERO3_DEBUG=1``
turns it on.
"""
import os
from dataclasses import dataclass

import torch

from deepscale import comm as dist

DEBUG_ENV = "DEEPSCALE_ZERO3_DEBUG"
_KIND_IDS = {"all_gather": 1, "reduce_scatter": 2, "broadcast": 3, "all_reduce": 4, "end_forward": 5,
             "end_backward": 6}


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


class SequenceChecker:
    """Checks that all ranks of ``group`` issue the same collective sequence.

    Args:
        group: the data-parallel process group (None: the default group).
        world_size: ranks in ``group``.
    """

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, world_size
        self.sequence = 0

    def check(self, info: CollectiveInfo) -> None:
        """Raise :class:`CollectiveDesyncError` when another rank is about to issue another collective."""
        self.sequence += 1
        if self.world_size == 1:
            return
        mine = torch.tensor([self.sequence, _KIND_IDS.get(info.kind, 0), info.group_index, info.numel],
                            dtype=torch.int64)
        rows = torch.empty(self.world_size * 4, dtype=torch.int64)
        dist.all_gather_into_tensor(rows, mine, group=self.group)
        rows = rows.view(self.world_size, 4)
        if bool((rows == rows[0]).all()):
            return
        described = [None] * self.world_size
        dist.all_gather_object(described, info.describe(), group=self.group)
        lines = "\n".join(f"  rank {rank}: {text}" for rank, text in enumerate(described))
        raise CollectiveDesyncError(f"ZeRO-3 ranks diverged at collective #{self.sequence}: they are about to "
                                    f"communicate different parameters (a data-dependent branch or a skipped "
                                    f"forward/backward on some rank?):\n{lines}")
