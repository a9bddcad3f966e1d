"""Pipeline schedules as data: per-stage instruction lists produced by pure generators.

A schedule says, for every pipeline stage, the exact sequence of instructions one training (or
evaluation) batch runs: load a micro-batch, receive an activation, run a forward, send it on,
receive a gradient, run a backward (whole, or split into input-gradient and weight-gradient
halves), send the gradient back, then reduce gradients and step. One executor
(``executor.py``) runs any of them; ``simulator.py`` checks and times them without processes.

Note: how a schedule is generated. A generator decides only the *compute order* of each stage,
a list of ``(kind, micro_batch, chunk)`` with kind ``F`` (forward), ``B`` (whole backward), ``I``
(backward for the input gradient) or ``W`` (backward for the weight gradient). :func:`lower`
then inserts the communication: a receive right before the compute that needs it, a send right
after the compute that produces it. Sends never block (they are posted and waited on later) and
receives block, so a schedule cannot deadlock as long as its dependency graph in program order
is acyclic, which the simulator checks.

Schedules (p stages, m micro-batches, v model chunks per stage; F, B, W the compute times):
  * ``gpipe``: all forwards, then all backwards. Bubble (p-1)/(m+p-1) of the step, but every
    stage keeps the activations of all m micro-batches.
  * ``1f1b`` (the default, DeepSpeed's): p-s-1 warm-up forwards on stage s, then one forward one
    backward. Same bubble, at most p-s micro-batches alive on stage s (Narayanan et al. 2021,
    "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM").
  * ``interleaved_1f1b``: v chunks per stage placed round-robin; the bubble divides by v
    ((p-1)/(v*m + p-1) of the step) at the cost of v times more messages; m must be a multiple
    of p (same paper, section 2.2).
  * ``zb_h1``: the backward is split into I and W; W passes are deferred to fill the bubbles.
    With F = B = W the bubble is (p-1)/(3m) of the ideal time instead of (p-1)/m, for the
    same activation memory as 1F1B's stage 0 (Qi et al. 2024, "Zero Bubble Pipeline
    Parallelism").
  * ``zb_v``: 2 chunks per stage in a V (stage 0 holds the first and the last chunk) with the
    split backward; close to zero bubble at 1F1B's peak memory (same paper, section 6).
The ZB orders come from a greedy list scheduler run on unit costs (earliest start first, ties
B/I before F before W, forwards limited by an activation budget), so they are exact for equal
costs and reasonable otherwise.
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional, Tuple

from deepscale.runtime.pipe.module import owner_of, virtual_stage_of


class Op(str, Enum):
    LOAD = "load_micro_batch"
    FORWARD = "forward"
    BACKWARD = "backward"
    BACKWARD_INPUT = "backward_input"
    BACKWARD_WEIGHT = "backward_weight"
    SEND_ACT = "send_activation"
    RECV_ACT = "recv_activation"
    SEND_GRAD = "send_grad"
    RECV_GRAD = "recv_grad"
    REDUCE_GRADS = "reduce_grads"
    REDUCE_TIED = "reduce_tied_grads"
    STEP = "optimizer_step"


COMPUTE_OPS = {Op.FORWARD: "F", Op.BACKWARD: "B", Op.BACKWARD_INPUT: "I", Op.BACKWARD_WEIGHT: "W"}
_KIND_TO_OP = {v: k for k, v in COMPUTE_OPS.items()}


@dataclass(frozen=True)
class Instruction:
    """One step of a stage's program. ``peer`` is the pipeline stage on the other end of a send or
    receive (it may be the stage itself when a V placement turns around)."""

    op: Op
    micro_batch: int = -1
    chunk: int = 0
    peer: int = -1

    def __repr__(self) -> str:
        parts = [self.op.value]
        if self.micro_batch >= 0:
            parts.append(f"mb={self.micro_batch}")
            parts.append(f"chunk={self.chunk}")
        if self.peer >= 0:
            parts.append(f"peer={self.peer}")
        return f"{parts[0]}({', '.join(parts[1:])})"


@dataclass
class Schedule:
    """A whole batch's program: ``stages[s]`` is the instruction list of pipeline stage ``s``."""

    name: str
    num_stages: int
    num_micro_batches: int
    num_virtual_stages: int
    placement: str
    train: bool
    stages: List[List[Instruction]] = field(default_factory=list)

    @property
    def split_backward(self) -> bool:
        return any(i.op is Op.BACKWARD_WEIGHT for prog in self.stages for i in prog)

    def virtual_stage(self, stage: int, chunk: int) -> int:
        return virtual_stage_of(stage, chunk, self.num_stages, self.placement)

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.num_stages} stages, {self.num_micro_batches} micro-batches, "
                 f"{self.num_virtual_stages} chunk(s) per stage"]
        for stage, prog in enumerate(self.stages):
            lines.append(f"  stage {stage}: " + " ".join(_short(i) for i in prog))
        return "\n".join(lines)


def _short(ins: Instruction) -> str:
    if ins.op in COMPUTE_OPS:
        return f"{COMPUTE_OPS[ins.op]}{ins.micro_batch}" + (f".{ins.chunk}" if ins.chunk else "")
    return "" if ins.op in (Op.SEND_ACT, Op.RECV_ACT, Op.SEND_GRAD, Op.RECV_GRAD, Op.LOAD) else ins.op.value


# --- compute orders -------------------------------------------------------------------------
Order = List[Tuple[str, int, int]]  # (kind, micro_batch, chunk)


def _order_gpipe(p: int, m: int, s: int) -> Order:
    return [("F", mb, 0) for mb in range(m)] + [("B", mb, 0) for mb in range(m)]


def _order_1f1b(p: int, m: int, s: int) -> Order:
    warmup = min(p - s - 1, m)
    order = [("F", mb, 0) for mb in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i, 0), ("B", i, 0)]
    order += [("B", mb, 0) for mb in range(m - warmup, m)]
    return order


def _order_interleaved(p: int, m: int, s: int, v: int) -> Order:
    total = m * v

    def fwd(k):
        return ("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def bwd(k):
        return ("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    warmup = min((p - s - 1) * 2 + (v - 1) * p, total)
    order = [fwd(k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [fwd(warmup + i), bwd(i)]
    order += [bwd(k) for k in range(total - warmup, total)]
    return order


def _orders_greedy(p: int, m: int, v: int, placement: str, budget: int) -> List[Order]:
    """Zero-bubble orders from a list scheduler on unit F/I/W costs (see the module Note).

    ``budget``: chunk-activations a stage may hold (a forward waits while a stage holds that many
    micro-batch chunks whose W has not run).
    """
    num_vs = p * v
    f_done: Dict[Tuple[int, int], int] = {}
    i_done: Dict[Tuple[int, int], int] = {}
    free = [0] * p
    next_f = [[0] * v for _ in range(p)]
    next_i = [[0] * v for _ in range(p)]
    pending_w: List[List[Tuple[int, int, int]]] = [[] for _ in range(p)]  # (ready_time, mb, chunk)
    alive = [0] * p
    orders: List[Order] = [[] for _ in range(p)]
    remaining = 3 * m * v * p
    while remaining:
        best = None  # (start, priority, stage, kind, mb, chunk)
        for s in range(p):
            for c in range(v):
                vs = virtual_stage_of(s, c, p, placement)
                mb = next_i[s][c]
                if mb < m and (mb, vs) in f_done and (vs == num_vs - 1 or (mb, vs + 1) in i_done):
                    ready = max(f_done[(mb, vs)], i_done.get((mb, vs + 1), 0))
                    cand = (max(free[s], ready), 0, -vs, s, "I", mb, c)
                    best = cand if best is None or cand < best else best
                mb = next_f[s][c]
                if mb < m and alive[s] < budget and (vs == 0 or (mb, vs - 1) in f_done):
                    cand = (max(free[s], f_done.get((mb, vs - 1), 0)), 1, -vs, s, "F", mb, c)
                    best = cand if best is None or cand < best else best
            if pending_w[s]:
                ready, mb, c = pending_w[s][0]
                cand = (max(free[s], ready), 2, 0, s, "W", mb, c)
                best = cand if best is None or cand < best else best
        assert best is not None, "greedy scheduler stalled (activation budget too small)"
        start, _, _, s, kind, mb, c = best
        vs = virtual_stage_of(s, c, p, placement)
        end = start + 1
        free[s] = end
        orders[s].append((kind, mb, c))
        if kind == "F":
            f_done[(mb, vs)] = end
            next_f[s][c] += 1
            alive[s] += 1
        elif kind == "I":
            i_done[(mb, vs)] = end
            next_i[s][c] += 1
            pending_w[s].append((end, mb, c))
        else:
            pending_w[s].pop(0)
            alive[s] -= 1
        remaining -= 1
    return orders


# --- lowering: compute orders -> instruction lists -------------------------------------------
def lower(orders: List[Order], num_stages: int, num_virtual_stages: int, placement: str,
          train: bool) -> List[List[Instruction]]:
    """Insert loads, receives, sends and the end-of-batch instructions around each compute."""
    p, num_vs = num_stages, num_stages * num_virtual_stages
    programs = []
    for s, order in enumerate(orders):
        prog: List[Instruction] = []
        loaded = set()  # one load per micro-batch even when a stage holds the first and the last chunk
        for kind, mb, c in order:
            vs = virtual_stage_of(s, c, p, placement)
            op = _KIND_TO_OP[kind]
            if kind == "F":
                if (vs == 0 or vs == num_vs - 1) and mb not in loaded:
                    loaded.add(mb)
                    prog.append(Instruction(Op.LOAD, mb, c))
                if vs > 0:
                    prog.append(Instruction(Op.RECV_ACT, mb, c, owner_of(vs - 1, p, placement)[0]))
                prog.append(Instruction(op, mb, c))
                if vs < num_vs - 1:
                    prog.append(Instruction(Op.SEND_ACT, mb, c, owner_of(vs + 1, p, placement)[0]))
            elif kind in ("B", "I"):
                if vs < num_vs - 1:
                    prog.append(Instruction(Op.RECV_GRAD, mb, c, owner_of(vs + 1, p, placement)[0]))
                prog.append(Instruction(op, mb, c))
                if vs > 0:
                    prog.append(Instruction(Op.SEND_GRAD, mb, c, owner_of(vs - 1, p, placement)[0]))
            else:
                prog.append(Instruction(op, mb, c))
        if train:
            prog += [Instruction(Op.REDUCE_GRADS), Instruction(Op.REDUCE_TIED), Instruction(Op.STEP)]
        programs.append(prog)
    return programs


SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zb_h1", "zb_v")
#: The module layout each schedule needs: (virtual stages per stage or None for any >1, placement).
SCHEDULE_LAYOUT = {"1f1b": (1, "loop"), "gpipe": (1, "loop"), "interleaved_1f1b": (None, "loop"),
                   "zb_h1": (1, "loop"), "zb_v": (2, "v")}


def check_schedule_layout(name: str, num_virtual_stages: int, placement: str) -> None:
    """Raise ``ValueError`` when a PipelineModule's chunk layout does not suit schedule ``name``."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline.schedule={name!r} is not known; allowed: {', '.join(SCHEDULES)}")
    need_v, need_placement = SCHEDULE_LAYOUT[name]
    if need_v is None:
        if num_virtual_stages < 2 or placement != need_placement:
            raise ValueError(f"pipeline.schedule={name!r} needs PipelineModule(num_virtual_stages>=2, "
                             f"virtual_placement='loop'), got num_virtual_stages={num_virtual_stages}, "
                             f"virtual_placement={placement!r}")
    elif num_virtual_stages != need_v or (need_v > 1 and placement != need_placement):
        raise ValueError(f"pipeline.schedule={name!r} needs PipelineModule(num_virtual_stages={need_v}"
                         + (f", virtual_placement={need_placement!r}" if need_v > 1 else "") +
                         f"), got num_virtual_stages={num_virtual_stages}, virtual_placement={placement!r}")


def train_schedule(name: str, num_stages: int, num_micro_batches: int, num_virtual_stages: int = 1,
                   placement: Optional[str] = None) -> Schedule:
    """The training program of schedule ``name`` (one of :data:`SCHEDULES`).

    Args:
        name: the schedule.
        num_stages: pipeline stages (p).
        num_micro_batches: micro-batches per step (m, the gradient accumulation steps).
        num_virtual_stages: model chunks per stage (v); interleaved needs >= 2, ZB-V exactly 2.
        placement: chunk placement; default from the schedule (``loop``, or ``v`` for ZB-V).
    """
    p, m, v = num_stages, num_micro_batches, num_virtual_stages
    placement = placement or SCHEDULE_LAYOUT.get(name, (1, "loop"))[1]
    check_schedule_layout(name, v, placement) if p > 1 or v > 1 else None
    if m < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch (gradient_accumulation_steps), got {m}")
    if name == "gpipe":
        orders = [_order_gpipe(p, m, s) for s in range(p)]
    elif name == "1f1b":
        orders = [_order_1f1b(p, m, s) for s in range(p)]
    elif name == "interleaved_1f1b":
        if m % p:
            raise ValueError(f"pipeline.schedule='interleaved_1f1b' needs gradient_accumulation_steps to be a "
                             f"multiple of the {p} pipeline stages, got {m}")
        orders = [_order_interleaved(p, m, s, v) for s in range(p)]
    elif name == "zb_h1":
        orders = _orders_greedy(p, m, 1, "loop", budget=p + 1)
    else:  # zb_v
        orders = _orders_greedy(p, m, 2, "v", budget=2 * p)
    return Schedule(name, p, m, v, placement, True, lower(orders, p, v, placement, train=True))


def eval_schedule(num_stages: int, num_micro_batches: int, num_virtual_stages: int = 1,
                  placement: str = "loop") -> Schedule:
    """Forward-only program: every micro-batch through every chunk in order."""
    p, v = num_stages, num_virtual_stages
    orders = []
    for s in range(p):
        chunks = sorted(range(v), key=lambda c: virtual_stage_of(s, c, p, placement))
        orders.append([("F", mb, c) for c in chunks for mb in range(num_micro_batches)])
    return Schedule("eval", p, num_micro_batches, v, placement, False, lower(orders, p, v, placement, train=False))
