"""Schedules without processes: every generated program is valid and the simulated bubbles and
activation peaks match the formulas."""
import pytest

from deepscale.runtime.pipe.schedules import Instruction, Op, Schedule, eval_schedule, train_schedule
from deepscale.runtime.pipe.simulator import ScheduleError, simulate

CASES = [(p, m) for p in (1, 2, 4, 8) for m in (1, 2, 3, 4, 8, 16)]


def _v(name):
    return 2 if name in ("interleaved_1f1b", "zb_v") else 1


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v"])
def test_every_schedule_is_valid(name):
    for p, m in CASES:
        if name == "interleaved_1f1b" and m % p:
            with pytest.raises(ValueError, match="multiple of"):
                train_schedule(name, p, m, 2)
            continue
        sched = train_schedule(name, p, m, _v(name))
        # gloo matches by tag (order per kind); everything but ZB-V also keeps NCCL's strict order.
        simulate(sched, strict_pair_order=False)
        if name != "zb_v":
            simulate(sched, strict_pair_order=True)
        for prog in sched.stages:
            assert prog[-3:] == [Instruction(Op.REDUCE_GRADS), Instruction(Op.REDUCE_TIED), Instruction(Op.STEP)]
        loads = [sum(1 for i in prog if i.op is Op.LOAD) for prog in sched.stages]
        assert loads[0] == m and (p == 1 or loads[-1] == m or name == "zb_v")
        assert all(n == 0 for n in loads[1:-1])


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8), (4, 16), (8, 16)])
def test_1f1b_bubble_and_memory(p, m):
    result = simulate(train_schedule("1f1b", p, m), costs={"F": 1, "B": 2})
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert result.peak_alive[0] == min(p, m)
    assert result.peak_alive == [min(p - s, m) for s in range(p)]
    assert simulate(train_schedule("gpipe", p, m)).peak_alive[0] == m


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 16, 2), (8, 16, 2)])
def test_interleaved_bubble_divides_by_v(p, m, v):
    result = simulate(train_schedule("interleaved_1f1b", p, m, v), costs={"F": 1 / v, "B": 2 / v})
    # Idle time relative to the ideal m(F+B) is (p-1)/(v*m): 1F1B's (p-1)/m divided by v.
    assert result.bubble_ratio == pytest.approx((p - 1) / (v * m))
    assert result.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (4, 4), (4, 8), (4, 16), (8, 8)])
def test_zb_h1_bubble(p, m):
    result = simulate(train_schedule("zb_h1", p, m), costs={"F": 1, "I": 1, "W": 1})
    assert result.bubble_ratio == pytest.approx((p - 1) / (3 * m))
    baseline = simulate(train_schedule("1f1b", p, m), costs={"F": 1, "B": 2})
    assert result.bubble_ratio == pytest.approx(baseline.bubble_ratio / 3)
    assert max(result.peak_alive) <= p + 1


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_zb_v_beats_zb_h1_at_same_memory_budget(p, m):
    zbv = simulate(train_schedule("zb_v", p, m, 2), costs={"F": 0.5, "I": 0.5, "W": 0.5}, strict_pair_order=False)
    zbh1 = simulate(train_schedule("zb_h1", p, m), costs={"F": 1, "I": 1, "W": 1})
    assert zbv.bubble_ratio < zbh1.bubble_ratio
    # Chunk activations are half a stage's: 2p chunks is the memory of p whole micro-batches.
    assert max(zbv.peak_alive) <= 2 * p


def test_eval_schedule_forward_only():
    sched = eval_schedule(4, 6)
    assert not any(i.op in (Op.BACKWARD, Op.STEP) for prog in sched.stages for i in prog)
    assert simulate(sched).makespan == pytest.approx(6 + 3)


def test_simulator_rejects_invalid_programs():
    good = train_schedule("1f1b", 2, 2)
    swapped = [list(prog) for prog in good.stages]
    # Stage 1 expects micro-batch 1 before 0: the link order no longer matches.
    recvs = [i for i, ins in enumerate(swapped[1]) if ins.op is Op.RECV_ACT]
    swapped[1][recvs[0]], swapped[1][recvs[1]] = swapped[1][recvs[1]], swapped[1][recvs[0]]
    with pytest.raises(ScheduleError, match="next message"):
        simulate(Schedule("bad", 2, 2, 1, "loop", True, swapped))
    backward_first = [list(prog) for prog in good.stages]
    backward_first[1] = [Instruction(Op.BACKWARD, 0)] + backward_first[1]
    with pytest.raises(ScheduleError, match="before its F|twice"):
        simulate(Schedule("bad", 2, 2, 1, "loop", True, backward_first))
    # Both stages wait for each other: stage 0 receives a gradient before sending the activation.
    deadlock = [[Instruction(Op.RECV_GRAD, 0, 0, 1), Instruction(Op.LOAD, 0), Instruction(Op.FORWARD, 0),
                 Instruction(Op.SEND_ACT, 0, 0, 1), Instruction(Op.BACKWARD, 0)],
                [Instruction(Op.RECV_ACT, 0, 0, 0), Instruction(Op.LOAD, 0), Instruction(Op.FORWARD, 0),
                 Instruction(Op.BACKWARD, 0), Instruction(Op.SEND_GRAD, 0, 0, 0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(Schedule("bad", 2, 1, 1, "loop", True, deadlock))


def test_unknown_schedule_and_layout_errors():
    with pytest.raises(ValueError, match="not known"):
        train_schedule("chimera", 2, 4)
    with pytest.raises(ValueError, match="num_virtual_stages"):
        train_schedule("interleaved_1f1b", 2, 4, 1)
    with pytest.raises(ValueError, match="num_virtual_stages=2"):
        train_schedule("zb_v", 2, 4, 3)


def test_schedule_prints():
    text = str(train_schedule("1f1b", 2, 2))
    assert "stage 0: F0 F1" in text.replace("  ", " ") or "F0" in text
