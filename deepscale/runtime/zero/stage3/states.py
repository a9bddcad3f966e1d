"""The explicit state machines of ZeRO stage 3.

Note: why state machines. A partitioned parameter is usable only while its group is gathered,
and every gather/release is a collective all ranks must issue in the same order. Encoding the
states as enums with a table of allowed transitions turns misuse (a release of a group still
being gathered, a step in the middle of backward) into an immediate error naming the states,
instead of a wrong result or a hang several collectives later.
"""
from enum import Enum
from typing import Dict, FrozenSet


class ZeroParamStatus(Enum):
    """Where a partitioned parameter's full value is (DeepSpeed's names and values).

    ``AVAILABLE``: ``param.data`` is the full tensor. ``NOT_AVAILABLE``: ``param.data`` is empty
    and the rank holds only ``param.ds_tensor``. ``INFLIGHT``: an all-gather is under way.
    """

    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


class ShardState(Enum):
    """State of a parameter group (the unit that is all-gathered together)."""

    SHARDED = "sharded"
    GATHERING = "gathering"
    GATHERED = "gathered"


class TrainingState(Enum):
    """Phase of the training loop as seen by the stage-3 hooks."""

    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"
    STEP = "step"


_SHARD_TRANSITIONS: Dict[ShardState, FrozenSet[ShardState]] = {
    ShardState.SHARDED: frozenset({ShardState.GATHERING, ShardState.GATHERED}),
    ShardState.GATHERING: frozenset({ShardState.GATHERED}),
    ShardState.GATHERED: frozenset({ShardState.SHARDED}),
}

_TRAINING_TRANSITIONS: Dict[TrainingState, FrozenSet[TrainingState]] = {
    TrainingState.IDLE: frozenset({TrainingState.FORWARD, TrainingState.BACKWARD, TrainingState.STEP}),
    TrainingState.FORWARD: frozenset({TrainingState.IDLE}),
    TrainingState.BACKWARD: frozenset({TrainingState.IDLE}),
    TrainingState.STEP: frozenset({TrainingState.IDLE}),
}


class StateMachine:
    """Holds one state and refuses transitions the table does not allow.

    Args:
        initial: the starting state.
        transitions: state -> set of states it may move to.
        what: a name for error messages, e.g. ``"parameter group 3"``.
    """

    def __init__(self, initial: Enum, transitions: Dict[Enum, FrozenSet[Enum]], what: str):
        self.state = initial
        self._transitions = transitions
        self.what = what

    def to(self, new: Enum) -> None:
        """Move to ``new``; raises RuntimeError when the table does not allow it."""
        if new not in self._transitions[self.state]:
            allowed = sorted(s.value for s in self._transitions[self.state])
            raise RuntimeError(f"ZeRO-3: {self.what} cannot go from {self.state.value} to {new.value}; "
                               f"allowed: {allowed}")
        self.state = new

    def __eq__(self, other) -> bool:  # compare with a state directly
        return self.state == other

    __hash__ = None


def shard_state_machine(what: str) -> StateMachine:
    """A :class:`ShardState` machine starting ``SHARDED``."""
    return StateMachine(ShardState.SHARDED, _SHARD_TRANSITIONS, what)


def training_state_machine() -> StateMachine:
    """A :class:`TrainingState` machine starting ``IDLE``."""
    return StateMachine(TrainingState.IDLE, _TRAINING_TRANSITIONS, "the training state")
