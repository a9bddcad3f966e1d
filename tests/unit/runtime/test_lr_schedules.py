"""LR schedules: values step by step against hand-computed formulas, state, factory errors."""
import math

import pytest
import torch

from deepscale.runtime import lr_schedules as ls
from deepscale.runtime.lr_schedules import (LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR,
                                            build_lr_scheduler)


def _optimizer(lr=0.5, cls=torch.optim.AdamW, groups=1):
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return cls(params, lr=lr)


def _run(schedule, num_steps):
    """The lr written into the optimizer after each of ``num_steps`` steps."""
    lrs = []
    for _ in range(num_steps):
        schedule.step()
        lrs.append(schedule.optimizer.param_groups[0]["lr"])
    return lrs


def test_valid_schedule_names():
    assert ls.VALID_LR_SCHEDULES == ["LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]


def test_warmup_lr_log_then_hold():
    opt = _optimizer()
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10)
    assert opt.param_groups[0]["lr"] == 0.0  # constructor writes the start lr
    lrs = _run(sched, 12)  # batches 0..11
    assert lrs[0] == pytest.approx(0.0)
    assert lrs[1] == pytest.approx(0.1 * math.log(2) / math.log(10))
    assert lrs[4] == pytest.approx(0.1 * math.log(5) / math.log(10))
    assert lrs[9] == pytest.approx(0.1)
    assert lrs[10] == lrs[11] == pytest.approx(0.1)
    assert sched.get_last_lr() == [pytest.approx(0.1)]


def test_warmup_lr_linear_and_default_max_is_optimizer_lr():
    opt = _optimizer(lr=0.2)
    sched = WarmupLR(opt, warmup_min_lr=0.02, warmup_num_steps=4, warmup_type="linear")
    lrs = _run(sched, 5)
    assert lrs == pytest.approx([0.02, 0.02 + 0.18 * 0.25, 0.02 + 0.18 * 0.5, 0.02 + 0.18 * 0.75, 0.2])


def test_warmup_lr_per_group_lists():
    opt = _optimizer(groups=2)
    sched = WarmupLR(opt, warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.5], warmup_num_steps=2,
                     warmup_type="linear")
    sched.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.3])
    with pytest.raises(ValueError, match="warmup_min_lr has 3 values but the optimizer has 2"):
        WarmupLR(opt, warmup_min_lr=[0.0, 0.1, 0.2])


def test_warmup_decay_lr():
    opt = _optimizer()
    sched = WarmupDecayLR(opt, total_num_steps=20, warmup_max_lr=0.1, warmup_num_steps=10, warmup_type="linear")
    lrs = _run(sched, 26)
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.1)  # (20 - 10) / (20 - 10)
    assert lrs[15] == pytest.approx(0.05)
    assert lrs[20] == pytest.approx(0.0)
    assert lrs[25] == pytest.approx(0.0)  # never negative


def test_warmup_cosine_lr():
    opt = _optimizer(lr=1.0)
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_min_ratio=0.2, warmup_num_steps=4, cos_min_ratio=0.1,
                           warmup_type="linear")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    lrs = _run(sched, 13)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[2] == pytest.approx(0.6)
    assert lrs[3] == pytest.approx(0.8)
    # batch 4: progress (4 - 4 + 1) / (10 - 4) = 1/6 into the cosine
    assert lrs[4] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 6)) / 2)
    assert lrs[9] == pytest.approx(0.1)
    assert lrs[12] == pytest.approx(0.1)  # held at the floor, not oscillating back up


def test_warmup_cosine_log_warmup():
    opt = _optimizer(lr=2.0)
    sched = WarmupCosineLR(opt, total_num_steps=100, warmup_min_ratio=0.0, warmup_num_steps=4)
    lrs = _run(sched, 2)
    assert lrs[1] == pytest.approx(2.0 * math.log(2) / math.log(4))


def test_one_cycle_lr_and_momentum():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.5, betas=(0.5, 0.999))
    sched = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4, cycle_second_step_size=2,
                     decay_lr_rate=0.5, decay_step_size=2, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.999))  # the cycle starts at max momentum
    lrs, moms = [], []
    for _ in range(8):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"][0])
    # rising over 4 batches, falling over 2, then decaying min_lr / (1 + 0.5 * k / 2)
    assert lrs == pytest.approx([0.0325, 0.055, 0.0775, 0.1, 0.055, 0.01, 0.01 / 1.25, 0.01 / 1.5])
    assert moms == pytest.approx([0.875, 0.85, 0.825, 0.8, 0.85, 0.9, 0.9 * 1.05, 0.9 * 1.1])
    assert opt.param_groups[0]["betas"][1] == pytest.approx(0.999)  # beta2 untouched


def test_one_cycle_staircase():
    opt = _optimizer()
    sched = OneCycle(opt, cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=4, cycle_first_stair_count=2,
                     cycle_momentum=False)
    assert _run(sched, 8) == pytest.approx([0.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.0, 0.0])


def test_one_cycle_without_betas_disables_momentum():
    opt = _optimizer(cls=torch.optim.SGD)
    sched = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=2)
    sched.step()
    assert sched.cycle_momentum is False and sched.get_mom() is None
    assert "betas" not in opt.param_groups[0]


def test_lr_range_test_continuous_and_staircase():
    opt = _optimizer()
    cont = LRRangeTest(opt, lr_range_test_min_lr=0.01, lr_range_test_step_size=2, lr_range_test_step_rate=0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert _run(cont, 3) == pytest.approx([0.0125, 0.015, 0.0175])
    stair = LRRangeTest(_optimizer(), lr_range_test_min_lr=0.01, lr_range_test_step_size=2,
                        lr_range_test_step_rate=0.5, lr_range_test_staircase=True)
    assert _run(stair, 4) == pytest.approx([0.01, 0.015, 0.015, 0.02])


def test_step_to_explicit_iteration_and_tensor_lr():
    lr = torch.tensor(0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = WarmupLR(opt, warmup_max_lr=0.1, warmup_num_steps=10, warmup_type="linear")
    sched.step(5)
    assert sched.last_batch_iteration == 5
    assert opt.param_groups[0]["lr"] is lr  # filled in place, not replaced
    assert float(lr) == pytest.approx(0.05)


@pytest.mark.parametrize("make", [
    lambda o: WarmupLR(o, warmup_max_lr=0.1, warmup_num_steps=5),
    lambda o: WarmupDecayLR(o, total_num_steps=12, warmup_num_steps=4),
    lambda o: WarmupCosineLR(o, total_num_steps=12, warmup_num_steps=4),
    lambda o: OneCycle(o, 0.01, 0.1, cycle_first_step_size=3, decay_step_size=2, decay_lr_rate=0.1),
    lambda o: LRRangeTest(o, lr_range_test_step_size=3),
])
def test_state_dict_round_trip(make):
    original = make(_optimizer())
    _run(original, 7)
    state = original.state_dict()
    assert state == {"last_batch_iteration": 6}
    resumed = make(_optimizer())
    resumed.load_state_dict(state)
    for _ in range(3):
        original.step()
        resumed.step()
        assert resumed.get_last_lr() == pytest.approx(original.get_last_lr())


def test_get_last_lr_before_any_step_on_resume():
    sched = WarmupLR(_optimizer(), warmup_num_steps=5, last_batch_iteration=3)
    with pytest.raises(RuntimeError, match="call step"):
        sched.get_last_lr()


def test_factory_builds_ours_and_torch_fallback():
    opt = _optimizer(lr=1.0)
    ours = build_lr_scheduler("WarmupDecayLR", {"total_num_steps": 10, "warmup_num_steps": 2}, opt)
    assert isinstance(ours, WarmupDecayLR) and ours.total_num_steps == 10
    opt = _optimizer(lr=1.0, cls=torch.optim.SGD)
    step_lr = build_lr_scheduler("StepLR", {"step_size": 2, "gamma": 0.5}, opt)
    assert isinstance(step_lr, torch.optim.lr_scheduler.StepLR)
    lrs = []
    for _ in range(4):
        opt.step()
        step_lr.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.5, 0.5, 0.25])


def test_factory_unknown_name():
    with pytest.raises(ValueError, match=r"scheduler.type 'Foo' is not a known schedule; allowed: LRRangeTest, "
                       r"OneCycle, WarmupLR, WarmupDecayLR, WarmupCosineLR or any torch.optim.lr_scheduler"):
        build_lr_scheduler("Foo", {}, _optimizer())
    with pytest.raises(ValueError, match="not a known schedule"):
        build_lr_scheduler("Optimizer", {}, _optimizer())  # in the module, but not a schedule


@pytest.mark.parametrize("name, params, pattern", [
    ("WarmupLR", {"warmup_max": 0.1}, r"scheduler.params.warmup_max is not accepted by WarmupLR; accepted keys: "
     r"warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration"),
    ("WarmupDecayLR", {}, r"scheduler.params.total_num_steps is required by WarmupDecayLR"),
    ("WarmupLR", {"warmup_type": "cosine"}, r"scheduler.params.warmup_type must be one of 'log', 'linear'"),
    ("WarmupLR", {"warmup_num_steps": 0}, r"scheduler.params.warmup_num_steps must be a positive integer"),
    ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 1, "cycle_first_step_size": -3},
     r"scheduler.params.cycle_first_step_size must be a positive integer"),
    ("StepLR", {"step": 2}, r"scheduler.params.step is not accepted by StepLR; accepted keys: step_size"),
])
def test_factory_bad_params(name, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_lr_scheduler(name, params, _optimizer())


def test_non_optimizer_rejected():
    with pytest.raises(TypeError, match="param_groups"):
        WarmupLR(object())
