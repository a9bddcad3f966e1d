"""Check and time a :class:`~deepscale.runtime.pipe.schedules.Schedule` without processes.

The simulator runs every stage's program as the executor would: compute instructions take their
cost, sends never block, a receive waits for its message. It raises :class:`ScheduleError` when
a schedule is invalid (a backward before its forward, a micro-batch computed twice or never, a
receive whose message arrives in another order than the sender sent it, a deadlock) and
otherwise reports the makespan, each stage's busy time, the bubble fraction and the activation
high-water mark (micro-batch chunks whose forward ran and whose weight gradient has not).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from deepscale.runtime.pipe.schedules import COMPUTE_OPS, Instruction, Op, Schedule

_SENDS = {Op.SEND_ACT: "act", Op.SEND_GRAD: "grad"}
_RECVS = {Op.RECV_ACT: "act", Op.RECV_GRAD: "grad"}


class ScheduleError(ValueError):
    """The schedule is not runnable: the message says which stage and instruction."""


@dataclass
class SimulationResult:
    makespan: float
    busy: List[float]          # compute time of each stage
    finish: List[float]        # when each stage ran its last instruction
    peak_alive: List[int]      # activation high-water mark of each stage (micro-batch chunks)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all stages' time up to the makespan: 1 - sum(busy) / (p * makespan)."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan) if self.makespan else 0.0

    @property
    def bubble_ratio(self) -> float:
        """Idle time relative to the ideal (busy) time of the busiest stage: makespan / max(busy) - 1."""
        return self.makespan / max(self.busy) - 1.0 if max(self.busy) else 0.0


Costs = Union[Dict[str, float], Callable[[Instruction], float]]


def _cost_fn(costs: Optional[Costs]) -> Callable[[Instruction], float]:
    if callable(costs):
        return costs
    table = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, **(costs or {})}
    return lambda ins: table[COMPUTE_OPS[ins.op]] if ins.op in COMPUTE_OPS else table.get(ins.op.value, 0.0)


def simulate(schedule: Schedule, costs: Optional[Costs] = None, comm_latency: float = 0.0,
             strict_pair_order: bool = True) -> SimulationResult:
    """Run ``schedule`` on a model of the machine; see the module docstring.

    Args:
        schedule: the schedule to run.
        costs: seconds (or units) per compute kind ``{"F", "B", "I", "W"}`` (defaults 1, 2, 1, 1),
            or a function of the instruction; other instructions cost 0 unless named by their
            ``Op`` value (e.g. ``{"optimizer_step": 0.5}``).
        comm_latency: time from a send to its receive becoming possible.
        strict_pair_order: messages between two stages must be received in the order sent, whatever
            their kind (NCCL matches point-to-point operations in issue order); False checks the
            order per kind only (gloo matches by tag).
    """
    cost = _cost_fn(costs)
    p = schedule.num_stages
    _check_compute(schedule)
    pos, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    alive, peak = [0] * p, [0] * p
    channels: Dict[Tuple, List[Tuple[str, int, int, float]]] = {}
    taken: Dict[Tuple, int] = {}
    split = schedule.split_backward
    progress = True
    while progress:
        progress = False
        for s in range(p):
            prog = schedule.stages[s]
            while pos[s] < len(prog):
                ins = prog[pos[s]]
                if ins.op in _RECVS:
                    key = (ins.peer, s) if strict_pair_order else (ins.peer, s, _RECVS[ins.op])
                    queue, index = channels.get(key, []), taken.get(key, 0)
                    if index >= len(queue):
                        break  # the message is not sent yet: try other stages
                    kind, mb, chunk, sent = queue[index]
                    if (kind, mb, chunk) != (_RECVS[ins.op], ins.micro_batch, schedule.virtual_stage(s, ins.chunk)):
                        raise ScheduleError(f"stage {s} instruction {pos[s]} {ins!r} expects {_RECVS[ins.op]} of "
                                            f"micro-batch {ins.micro_batch} chunk {ins.chunk} from stage {ins.peer}, "
                                            f"but the next message on that link is {kind} of micro-batch {mb} "
                                            f"for virtual stage {chunk}")
                    taken[key] = index + 1
                    clock[s] = max(clock[s], sent + comm_latency)
                elif ins.op in _SENDS:
                    key = (s, ins.peer) if strict_pair_order else (s, ins.peer, _SENDS[ins.op])
                    dest = schedule.virtual_stage(s, ins.chunk) + (1 if ins.op is Op.SEND_ACT else -1)
                    channels.setdefault(key, []).append((_SENDS[ins.op], ins.micro_batch, dest, clock[s]))
                else:
                    duration = cost(ins)
                    clock[s] += duration
                    if ins.op in COMPUTE_OPS:
                        busy[s] += duration
                    if ins.op is Op.FORWARD and schedule.train:
                        alive[s] += 1
                        peak[s] = max(peak[s], alive[s])
                    elif ins.op is Op.BACKWARD_WEIGHT or (ins.op is Op.BACKWARD and not split):
                        alive[s] -= 1
                pos[s] += 1
                progress = True
    stuck = [s for s in range(p) if pos[s] < len(schedule.stages[s])]
    if stuck:
        where = ", ".join(f"stage {s} at {schedule.stages[s][pos[s]]!r}" for s in stuck)
        raise ScheduleError(f"schedule {schedule.name} deadlocks: {where}")
    unread = {k: len(q) - taken.get(k, 0) for k, q in channels.items() if len(q) > taken.get(k, 0)}
    if unread:
        raise ScheduleError(f"schedule {schedule.name} sends messages nobody receives: {unread}")
    makespan = max(clock) if clock else 0.0
    return SimulationResult(makespan=makespan, busy=busy, finish=clock, peak_alive=peak)


def _check_compute(schedule: Schedule) -> None:
    """Every (micro-batch, chunk) runs each compute kind once, backward halves after the forward."""
    m, v = schedule.num_micro_batches, schedule.num_virtual_stages
    for s, prog in enumerate(schedule.stages):
        seen: Dict[Tuple[str, int, int], int] = {}
        for index, ins in enumerate(prog):
            if ins.op not in COMPUTE_OPS:
                continue
            kind = COMPUTE_OPS[ins.op]
            key = (kind, ins.micro_batch, ins.chunk)
            if key in seen:
                raise ScheduleError(f"stage {s}: {ins!r} appears twice (instructions {seen[key]} and {index})")
            needs = {"B": "F", "I": "F", "W": "I"}.get(kind)
            if needs and (needs, ins.micro_batch, ins.chunk) not in seen:
                raise ScheduleError(f"stage {s} instruction {index}: {ins!r} runs before its {needs}")
            seen[key] = index
        kinds = ["F"] if not schedule.train else (["F", "I", "W"] if schedule.split_backward else ["F", "B"])
        for kind in kinds:
            for mb in range(m):
                for chunk in range(v):
                    if (kind, mb, chunk) not in seen:
                        raise ScheduleError(f"stage {s} never runs {kind} of micro-batch {mb} chunk {chunk}")
