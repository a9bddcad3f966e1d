"""Loss scalers: a scripted overflow sequence checked step by step, state, config, inf/nan check."""
import logging
import types

import pytest
import torch

from deepscale.runtime.precision.loss_scaler import (DynamicLossScaler, StaticLossScaler, build_loss_scaler,
                                                     has_inf_or_nan)
from deepscale.utils.logging import logger


class _Records(logging.Handler):

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))

    def warnings(self):
        return [m for level, m in self.messages if level == logging.WARNING]


@pytest.fixture
def records():
    handler = _Records()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# (overflow, expected scale, hysteresis, last_overflow_iter) after each update_scale call,
# for init 16, window 3, hysteresis 2, min scale 4. Growth happens on a clean step when
# (cur_iter - last_overflow_iter) % 3 == 0.
SCRIPT = [
    (False, 16, 2, -1),  # iter 0: (0 + 1) % 3 != 0
    (False, 16, 2, -1),  # iter 1
    (False, 32, 2, -1),  # iter 2: 3 % 3 == 0 -> grow, hysteresis refilled
    (True, 32, 1, 3),  # iter 3: overflow uses up one unit of hysteresis, scale kept
    (True, 16, 1, 4),  # iter 4: hysteresis exhausted -> halve
    (False, 16, 1, 4),  # iter 5: clean, but hysteresis is only refilled on growth
    (True, 8, 1, 6),  # iter 6: halve at once
    (True, 4, 1, 7),  # iter 7: halve to the minimum
    (True, 4, 1, 8),  # iter 8: already at the minimum -> warning, scale kept
    (False, 4, 1, 8),  # iter 9
    (False, 4, 1, 8),  # iter 10
    (False, 8, 2, 8),  # iter 11: (11 - 8) % 3 == 0 -> grow, hysteresis refilled
    (True, 8, 1, 12),  # iter 12: hysteresis again absorbs the first overflow
]


def _scripted_scaler(**kwargs):
    return DynamicLossScaler(init_scale=16, scale_window=3, min_scale=4, delayed_shift=2, **kwargs)


def test_scripted_sequence(records):
    scaler = _scripted_scaler()
    assert scaler.dynamic and scaler.loss_scale == 16 and scaler.cur_hysteresis == 2
    for i, (overflow, scale, hysteresis, last_overflow) in enumerate(SCRIPT):
        scaler.update_scale(overflow)
        assert (scaler.loss_scale, scaler.cur_hysteresis, scaler.last_overflow_iter) == \
            (scale, hysteresis, last_overflow), f"after iteration {i}"
        assert scaler.cur_iter == i + 1
        assert len(records.warnings()) == (1 if i >= 8 else 0), f"after iteration {i}"
    warning = records.warnings()[0]
    assert "loss scale is at its minimum (4) and gradients still overflow; the step is skipped" in warning
    assert "lower the learning rate, check the model for inf/nan, or use bf16" in warning


def test_warns_every_time_at_min_scale(records):
    scaler = DynamicLossScaler(init_scale=2, min_scale=1)
    for _ in range(4):
        scaler.update_scale(True)
    assert scaler.loss_scale == 1
    assert len(records.warnings()) == 3  # the first overflow still halved 2 -> 1


def test_raise_mode_at_min_scale():
    scaler = _scripted_scaler(raise_error_at_min_scale=True)
    for overflow, _, _, _ in SCRIPT[:8]:  # down to the minimum without error
        scaler.update_scale(overflow)
    assert scaler.loss_scale == 4
    with pytest.raises(RuntimeError, match=r"loss scale is at its minimum \(4\) and gradients still overflow"):
        scaler.update_scale(True)


def test_consecutive_hysteresis_refills_after_each_clean_step():
    scaler = DynamicLossScaler(init_scale=64, scale_window=100, delayed_shift=2, consecutive_hysteresis=True)
    for overflow in (True, False, True, False, True, False):
        scaler.update_scale(overflow)
    assert scaler.loss_scale == 64  # isolated overflows never exhaust the hysteresis
    assert scaler.cur_hysteresis == 2
    scaler.update_scale(True)
    scaler.update_scale(True)
    assert scaler.loss_scale == 32  # two in a row do


def test_without_consecutive_hysteresis_isolated_overflows_accumulate():
    scaler = DynamicLossScaler(init_scale=64, scale_window=100, delayed_shift=2)
    for overflow in (True, False, True):
        scaler.update_scale(overflow)
    assert scaler.loss_scale == 32


def test_default_hysteresis_one_halves_each_overflow_and_custom_factor():
    scaler = DynamicLossScaler(init_scale=81, scale_factor=3.0, scale_window=2, min_scale=1)
    scaler.update_scale(True)
    assert scaler.loss_scale == 27
    scaler.update_scale(False)
    scaler.update_scale(False)  # (2 - 0) % 2 == 0
    assert scaler.loss_scale == 81


def test_dynamic_state_dict_round_trip():
    scaler = _scripted_scaler()
    for overflow, _, _, _ in SCRIPT[:5]:
        scaler.update_scale(overflow)
    state = scaler.state_dict()
    resumed = _scripted_scaler()
    resumed.load_state_dict(state)
    assert (resumed.loss_scale, resumed.cur_iter, resumed.last_overflow_iter, resumed.cur_hysteresis) == (16, 5, 4, 1)
    for overflow, scale, hysteresis, last_overflow in SCRIPT[5:]:
        resumed.update_scale(overflow)
        assert (resumed.loss_scale, resumed.cur_hysteresis, resumed.last_overflow_iter) == \
            (scale, hysteresis, last_overflow)


def test_static_scaler():
    scaler = StaticLossScaler(128)
    assert not scaler.dynamic and scaler.loss_scale == 128
    scaler.update_scale(True)
    assert scaler.loss_scale == 128
    assert scaler.scale_loss(torch.tensor(2.0)).item() == 256
    restored = StaticLossScaler(1)
    restored.load_state_dict(scaler.state_dict())
    assert restored.loss_scale == 128


@pytest.mark.parametrize("kwargs, pattern", [
    ({"init_scale": 0}, "init_scale must be a positive finite number"),
    ({"scale_window": 2.5}, "scale_window must be a positive integer"),
    ({"delayed_shift": 0}, "delayed_shift must be a positive integer"),
    ({"scale_factor": 1.0}, "scale_factor must be > 1"),
    ({"min_scale": float("nan")}, "min_scale must be a positive finite number"),
])
def test_dynamic_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DynamicLossScaler(**kwargs)


def test_build_loss_scaler_from_config():
    cfg = types.SimpleNamespace(loss_scale=0, initial_scale_power=8, loss_scale_window=50, hysteresis=3,
                                consecutive_hysteresis=True, min_loss_scale=0.5, raise_error_at_min_scale=True)
    scaler = build_loss_scaler(cfg)
    assert isinstance(scaler, DynamicLossScaler)
    assert (scaler.loss_scale, scaler.scale_window, scaler.delayed_shift, scaler.min_scale) == (256, 50, 3, 0.5)
    assert scaler.consecutive_hysteresis and scaler.raise_error_at_min_scale
    static = build_loss_scaler(types.SimpleNamespace(loss_scale=1024))
    assert isinstance(static, StaticLossScaler) and static.loss_scale == 1024
    defaults = build_loss_scaler({})
    assert (defaults.loss_scale, defaults.scale_window, defaults.delayed_shift, defaults.min_scale) == \
        (2.0**16, 1000, 2, 1.0)


@pytest.mark.parametrize("cfg, pattern", [
    ({"loss_scale": -1}, "fp16.loss_scale must be 0"),
    ({"initial_scale_power": 100}, "fp16.initial_scale_power must be an integer in"),
    ({"hysteresis": 0}, "fp16.hysteresis must be a positive integer"),
    ({"loss_scale_window": 0}, "fp16.loss_scale_window must be a positive integer"),
])
def test_build_loss_scaler_bad_config(cfg, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_loss_scaler(cfg)


def test_has_inf_or_nan():
    finite = [torch.ones(3), torch.full((2, 2), 60000.0, dtype=torch.half), torch.zeros(4, dtype=torch.bfloat16)]
    assert has_inf_or_nan(finite) is False  # large finite fp16 values are not an overflow
    assert has_inf_or_nan(finite + [torch.tensor([1.0, float("inf")])]) is True
    assert has_inf_or_nan([torch.tensor([float("nan")], dtype=torch.half)] + finite) is True
    assert has_inf_or_nan(torch.tensor([-float("inf")])) is True
    assert has_inf_or_nan([None, torch.empty(0)]) is False
    assert has_inf_or_nan([]) is False


def test_has_overflow_reads_param_grads():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    assert DynamicLossScaler.has_overflow(params) is False  # no grads yet
    params[0].grad = torch.ones(2)
    params[1].grad = torch.tensor([0.0, float("nan")])
    assert DynamicLossScaler.has_overflow(params) is True
