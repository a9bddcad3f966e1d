"""Per-batch learning-rate schedules with DeepSpeed-compatible names and arguments.

Every schedule here is stepped once per training batch (not per epoch) and writes the
new learning rate straight into ``optimizer.param_groups``. The optimizer may be any
object with ``param_groups`` (a ``torch.optim.Optimizer``, or a wrapper such as a ZeRO
optimizer), so the same schedule drives plain and sharded training.

Index convention (shared with DeepSpeed so checkpoints and configs carry over):
``last_batch_iteration`` is the index of the last batch the schedule was stepped for;
``-1`` means "not started", and constructing a schedule with ``-1`` writes the
starting learning rate into the optimizer at once.

``build_lr_scheduler`` turns a ``scheduler`` config section into a schedule: one of ours
by name, else any ``torch.optim.lr_scheduler`` class.
"""
import inspect
import math

import torch

from deepscale.config.params import check_call_kwargs
from deepscale.utils.logging import logger

LR_SCHEDULE = "lr_schedule"
LR_RANGE_TEST = "LRRangeTest"
ONE_CYCLE = "OneCycle"
WARMUP_LR = "WarmupLR"
WARMUP_DECAY_LR = "WarmupDecayLR"
WARMUP_COSINE_LR = "WarmupCosineLR"
VALID_LR_SCHEDULES = [LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]

LR_RANGE_TEST_MIN_LR = "lr_range_test_min_lr"
LR_RANGE_TEST_STEP_RATE = "lr_range_test_step_rate"
LR_RANGE_TEST_STEP_SIZE = "lr_range_test_step_size"
LR_RANGE_TEST_STAIRCASE = "lr_range_test_staircase"

CYCLE_FIRST_STEP_SIZE = "cycle_first_step_size"
CYCLE_FIRST_STAIR_COUNT = "cycle_first_stair_count"
CYCLE_SECOND_STEP_SIZE = "cycle_second_step_size"
CYCLE_SECOND_STAIR_COUNT = "cycle_second_stair_count"
DECAY_STEP_SIZE = "decay_step_size"
CYCLE_MIN_LR = "cycle_min_lr"
CYCLE_MAX_LR = "cycle_max_lr"
DECAY_LR_RATE = "decay_lr_rate"
CYCLE_MOMENTUM = "cycle_momentum"
CYCLE_MIN_MOM = "cycle_min_mom"
CYCLE_MAX_MOM = "cycle_max_mom"
DECAY_MOM_RATE = "decay_mom_rate"

WARMUP_MIN_LR = "warmup_min_lr"
WARMUP_MAX_LR = "warmup_max_lr"
WARMUP_NUM_STEPS = "warmup_num_steps"
WARMUP_TYPE = "warmup_type"
WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"
VALID_WARMUP_TYPES = [WARMUP_LOG_RATE, WARMUP_LINEAR_RATE]
WARMUP_MIN_RATIO = "warmup_min_ratio"
COS_MIN_RATIO = "cos_min_ratio"
TOTAL_NUM_STEPS = "total_num_steps"
LAST_BATCH_ITERATION = "last_batch_iteration"


class ScheduleParamError(ValueError):
    """A bad schedule argument; ``key`` names the argument so config errors can cite it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key = key
        self.detail = message


def _check_positive_int(key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ScheduleParamError(key, f"must be a positive integer, got {value!r}")
    return value


def _check_number(key, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleParamError(key, f"must be a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ScheduleParamError(key, f"must be >= {minimum}, got {value!r}")
    return float(value)


def _check_warmup_type(value):
    if value not in VALID_WARMUP_TYPES:
        raise ScheduleParamError(WARMUP_TYPE, f"must be one of {', '.join(map(repr, VALID_WARMUP_TYPES))}; "
                                 f"got {value!r}")
    return value


def _param_groups_owner(optimizer):
    """The object whose ``param_groups`` we drive (unwraps one ``.optimizer`` level)."""
    if hasattr(optimizer, "param_groups"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "param_groups"):
        return inner
    raise TypeError(f"optimizer must have param_groups (a torch.optim.Optimizer or a wrapper of one); "
                    f"got {type(optimizer).__name__}")


def _per_group(optimizer, key, value):
    """Expand a scalar to one value per param group, or check a per-group list's length."""
    num_groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != num_groups:
            raise ScheduleParamError(key, f"has {len(value)} values but the optimizer has {num_groups} param groups")
        return [_check_number(key, v) for v in value]
    return [_check_number(key, value)] * num_groups


def _write_lrs(param_groups, lrs):
    """Store ``lrs`` into the groups; a tensor lr is filled in place so compiled/fused
    optimizers that captured the tensor keep seeing the live value."""
    for group, lr in zip(param_groups, lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return [float(group["lr"]) for group in param_groups]


def _warmup_fraction(warmup_type, iteration, warmup_num_steps):
    """Fraction of the warmup done at ``iteration`` (0 at the start, 1 at the end).

    'log' rises as log(i + 1) / log(N), fast at first; 'linear' as i / N.
    """
    if warmup_type == WARMUP_LOG_RATE:
        return math.log(iteration + 1) / math.log(warmup_num_steps)
    return iteration / warmup_num_steps


class _BatchSchedule:
    """Shared stepping and state for the schedules; subclasses define ``get_lr()``."""

    def __init__(self, optimizer, last_batch_iteration):
        self.optimizer = _param_groups_owner(optimizer)
        if isinstance(last_batch_iteration, bool) or not isinstance(last_batch_iteration, int) \
                or last_batch_iteration < -1:
            raise ScheduleParamError(LAST_BATCH_ITERATION, f"must be an integer >= -1, got {last_batch_iteration!r}")
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = None

    def _start(self):
        # A fresh schedule writes its starting lr; a resumed one leaves the optimizer as
        # restored from the checkpoint until the next step().
        if self.last_batch_iteration == -1:
            self._apply()

    def _apply(self):
        self._last_lr = _write_lrs(self.optimizer.param_groups, self.get_lr())

    def get_lr(self):
        """The learning rate of each param group at ``last_batch_iteration``."""
        raise NotImplementedError

    def get_last_lr(self):
        """The learning rates most recently written into the optimizer."""
        if self._last_lr is None:
            raise RuntimeError(f"{type(self).__name__}.get_last_lr(): no learning rate computed yet; call step() first")
        return self._last_lr

    def step(self, last_batch_iteration=None):
        """Advance to ``last_batch_iteration`` (default: the next batch) and update the optimizer."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._apply()

    def state_dict(self):
        """The resumable state (the same single key DeepSpeed stores)."""
        return {LAST_BATCH_ITERATION: self.last_batch_iteration}

    def load_state_dict(self, state_dict):
        """Restore the position saved by ``state_dict()``."""
        self.last_batch_iteration = state_dict[LAST_BATCH_ITERATION]


class LRRangeTest(_BatchSchedule):
    """Learning-rate range test: grow the lr from a base value to find where training diverges.

    lr = lr_range_test_min_lr * (1 + lr_range_test_step_rate * interval), where interval =
    (batch + 1) / lr_range_test_step_size, floored when ``lr_range_test_staircase``. Use the
    largest lr that still trains as the upper bound of a cyclic schedule (Smith 2018, "A
    disciplined approach to neural network hyper-parameters", arXiv:1803.09820).

    Args:
        optimizer: object with ``param_groups``.
        lr_range_test_min_lr (float or list): starting lr, per group if a list. Default 1e-3.
        lr_range_test_step_size (int): batches per lr increase interval. Default 2000.
        lr_range_test_step_rate (float): growth per interval. Default 1.0.
        lr_range_test_staircase (bool): grow in whole-interval steps. Default False.
        last_batch_iteration (int): index of the last batch, -1 to start fresh. Default -1.
    """

    def __init__(self, optimizer, lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000,
                 lr_range_test_step_rate=1.0, lr_range_test_staircase=False, last_batch_iteration=-1):
        super().__init__(optimizer, last_batch_iteration)
        self.min_lr = _per_group(self.optimizer, LR_RANGE_TEST_MIN_LR, lr_range_test_min_lr)
        self.step_size = _check_positive_int(LR_RANGE_TEST_STEP_SIZE, lr_range_test_step_size)
        self.step_rate = _check_number(LR_RANGE_TEST_STEP_RATE, lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        self._start()

    def _interval(self):
        interval = (self.last_batch_iteration + 1) / self.step_size
        return math.floor(interval) if self.staircase else interval

    def get_lr(self):
        growth = 1.0 + self.step_rate * self._interval()
        return [lr * growth for lr in self.min_lr]


class WarmupLR(_BatchSchedule):
    """Warm the lr up from ``warmup_min_lr`` to ``warmup_max_lr``, then hold it.

    lr = min + (max - min) * gamma, gamma = log(i + 1) / log(N) ('log') or i / N ('linear')
    for batch i < N = max(2, warmup_num_steps), and gamma = 1 afterwards.

    Args:
        optimizer: object with ``param_groups``.
        warmup_min_lr (float or list): starting lr. Default 0.0.
        warmup_max_lr (float or list): final lr; ``None`` keeps each group's current lr. Default None.
        warmup_num_steps (int): batches of warmup. Default 1000.
        warmup_type (str): 'log' or 'linear'. Default 'log'.
        last_batch_iteration (int): index of the last batch, -1 to start fresh. Default -1.
    """

    def __init__(self, optimizer, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        super().__init__(optimizer, last_batch_iteration)
        _check_positive_int(WARMUP_NUM_STEPS, warmup_num_steps)
        if warmup_max_lr is None:
            warmup_max_lr = [float(group["lr"]) for group in self.optimizer.param_groups]
        self.min_lrs = _per_group(self.optimizer, WARMUP_MIN_LR, warmup_min_lr)
        self.max_lrs = _per_group(self.optimizer, WARMUP_MAX_LR, warmup_max_lr)
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        # log(1) == 0 would divide by zero in the log warmup: one step of warmup is two.
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = _check_warmup_type(warmup_type)
        self._start()

    def _get_gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_fraction(self.warmup_type, self.last_batch_iteration, self.warmup_num_steps)
        return 1.0

    def get_lr(self):
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._get_gamma()
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """``WarmupLR`` followed by a linear decay to 0 at ``total_num_steps``.

    After warmup, gamma = max(0, (T - i) / max(1, T - N)) for batch i, T = total_num_steps.

    Args:
        optimizer: object with ``param_groups``.
        total_num_steps (int): batch at which the lr reaches 0. Required.
        warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration:
            as in ``WarmupLR``, except ``warmup_max_lr`` defaults to 0.001.
    """

    def __init__(self, optimizer, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        self.total_num_steps = _check_positive_int(TOTAL_NUM_STEPS, total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning(f"WarmupDecayLR: total_num_steps ({total_num_steps}) is less than "
                           f"warmup_num_steps ({warmup_num_steps}); the lr drops right after warmup")

    def _get_gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_fraction(self.warmup_type, self.last_batch_iteration, self.warmup_num_steps)
        remaining = self.total_num_steps - self.last_batch_iteration
        return max(0.0, remaining / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_BatchSchedule):
    """Warm up as a ratio of the optimizer's lr, then follow a half cosine down to a floor.

    The lr is ``base_lr * ratio`` where base_lr is each group's lr at construction. During
    warmup (batch i < N) ratio = warmup_min_ratio + (1 - warmup_min_ratio) * gamma (gamma as in
    ``WarmupLR``); afterwards, with p = min(1, (i - N + 1) / max(1, T - N)),
    ratio = cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2, held at the floor
    once p reaches 1 (Loshchilov & Hutter 2017, SGDR, without restarts).

    Args:
        optimizer: object with ``param_groups``.
        total_num_steps (int): batch at which the cosine reaches its floor. Required.
        warmup_min_ratio (float): starting ratio of the base lr. Default 0.0.
        warmup_num_steps (int): batches of warmup. Default 1000.
        cos_min_ratio (float): final ratio of the base lr. Default 0.0001.
        warmup_type (str): 'log' or 'linear'. Default 'log'.
        last_batch_iteration (int): index of the last batch, -1 to start fresh. Default -1.
    """

    def __init__(self, optimizer, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                 cos_min_ratio=0.0001, warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        super().__init__(optimizer, last_batch_iteration)
        self.total_num_steps = _check_positive_int(TOTAL_NUM_STEPS, total_num_steps)
        _check_positive_int(WARMUP_NUM_STEPS, warmup_num_steps)
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_min_ratio = _check_number(WARMUP_MIN_RATIO, warmup_min_ratio, minimum=0.0)
        self.cos_min_ratio = _check_number(COS_MIN_RATIO, cos_min_ratio, minimum=0.0)
        self.warmup_type = _check_warmup_type(warmup_type)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning(f"WarmupCosineLR: total_num_steps ({total_num_steps}) is less than "
                           f"warmup_num_steps ({warmup_num_steps}); the lr drops to the floor after warmup")
        self.org_lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        self._start()

    def get_lr_ratio(self):
        """The multiplier of the base lr at ``last_batch_iteration``."""
        i = self.last_batch_iteration
        if i < 0:
            return self.warmup_min_ratio
        if i < self.warmup_num_steps:
            gamma = _warmup_fraction(self.warmup_type, i, self.warmup_num_steps)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * gamma
        progress = min(1.0, (i - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self):
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


class OneCycle(_BatchSchedule):
    """1Cycle policy: one triangular lr cycle (momentum cycled inversely), then decay.

    The cycle rises from ``cycle_min_lr`` to ``cycle_max_lr`` over ``cycle_first_step_size``
    batches and falls back over ``cycle_second_step_size``; a stair count > 0 holds the value
    flat in that many equal stairs per half. After the cycle, the lr decays as
    ``cycle_min_lr / (1 + decay_lr_rate * k / decay_step_size)`` for the k-th batch past the
    cycle, and momentum grows as ``cycle_max_mom * (1 + decay_mom_rate * k / decay_step_size)``
    (Smith 2018, arXiv:1803.09820). Momentum is the first of an optimizer's ``betas``; with no
    ``betas`` in the param groups, momentum cycling is switched off with a warning.

    Before the first ``step()`` the optimizer holds the cycle's start: lr = cycle_min_lr and,
    consistently with the inverse cycle, beta1 = cycle_max_mom.

    Args:
        optimizer: object with ``param_groups``.
        cycle_min_lr (float or list): lower lr bound. Required.
        cycle_max_lr (float or list): upper lr bound. Required.
        decay_lr_rate (float): post-cycle lr decay rate; 0 disables. Default 0.
        cycle_first_step_size (int): batches in the rising half. Default 2000.
        cycle_second_step_size (int): batches in the falling half; None = first. Default None.
        cycle_first_stair_count (int): stairs in the rising half; 0 = continuous. Default 0.
        cycle_second_stair_count (int): stairs in the falling half; None = first. Default None.
        decay_step_size (int): batches per decay interval; 0 disables decay. Default 0.
        cycle_momentum (bool): cycle momentum inversely to lr. Default True.
        cycle_min_mom (float): lower momentum bound. Default 0.8.
        cycle_max_mom (float): upper momentum bound. Default 0.9.
        decay_mom_rate (float): post-cycle momentum growth rate; 0 disables. Default 0.
        last_batch_iteration (int): index of the last batch, -1 to start fresh. Default -1.
    """

    def __init__(self, optimizer, cycle_min_lr, cycle_max_lr, decay_lr_rate=0.0, cycle_first_step_size=2000,
                 cycle_second_step_size=None, cycle_first_stair_count=0, cycle_second_stair_count=None,
                 decay_step_size=0, cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.0,
                 last_batch_iteration=-1):
        super().__init__(optimizer, last_batch_iteration)
        self.first_step_size = _check_positive_int(CYCLE_FIRST_STEP_SIZE, cycle_first_step_size)
        self.second_step_size = self.first_step_size if cycle_second_step_size is None else \
            _check_positive_int(CYCLE_SECOND_STEP_SIZE, cycle_second_step_size)
        self.total_size = self.first_step_size + self.second_step_size
        self.first_stair_count = self._stair_count(CYCLE_FIRST_STAIR_COUNT, cycle_first_stair_count)
        self.second_stair_count = self.first_stair_count if cycle_second_stair_count is None else \
            self._stair_count(CYCLE_SECOND_STAIR_COUNT, cycle_second_stair_count)
        self.decay_step_size = _check_number(DECAY_STEP_SIZE, decay_step_size, minimum=0)
        self.min_lrs = _per_group(self.optimizer, CYCLE_MIN_LR, cycle_min_lr)
        self.max_lrs = _per_group(self.optimizer, CYCLE_MAX_LR, cycle_max_lr)
        self.decay_lr_rate = _check_number(DECAY_LR_RATE, decay_lr_rate)
        self.min_mom = _check_number(CYCLE_MIN_MOM, cycle_min_mom)
        self.max_mom = _check_number(CYCLE_MAX_MOM, cycle_max_mom)
        self.decay_mom_rate = _check_number(DECAY_MOM_RATE, decay_mom_rate)
        no_decay = self.decay_step_size == 0
        self.skip_lr_decay = no_decay or self.decay_lr_rate == 0
        self.skip_mom_decay = no_decay or self.decay_mom_rate == 0
        self.cycle_momentum = bool(cycle_momentum) and self._has_betas()
        self._start()

    @staticmethod
    def _stair_count(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ScheduleParamError(key, f"must be an integer >= 0, got {value!r}")
        return value

    def _has_betas(self):
        if all("betas" in group for group in self.optimizer.param_groups):
            return True
        logger.warning(f"OneCycle: cycle_momentum is switched off because {type(self.optimizer).__name__} "
                       f"has no 'betas' in its param groups")
        return False

    def _cycle_position(self):
        """How far up the cycle (0 at cycle_min_lr, 1 at cycle_max_lr) the next batch is."""
        # Work from the integer offset inside the cycle so stair boundaries are exact.
        offset = (self.last_batch_iteration + 1) % self.total_size
        if offset <= self.first_step_size:
            steps_from_low, half_size, stairs = offset, self.first_step_size, self.first_stair_count
        else:
            steps_from_low, half_size, stairs = self.total_size - offset, self.second_step_size, \
                self.second_stair_count
        if stairs > 0:
            return math.floor(steps_from_low * stairs / half_size) / stairs
        return steps_from_low / half_size

    def _in_cycle(self):
        return self.last_batch_iteration < self.total_size

    def _decay_interval(self):
        return (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size

    def get_lr(self):
        if self._in_cycle():
            position = self._cycle_position()
            return [lo + (hi - lo) * position for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        return [lo / (1.0 + self.decay_lr_rate * self._decay_interval()) for lo in self.min_lrs]

    def get_mom(self):
        """The momentum (beta1) at ``last_batch_iteration``, or None when not cycling it."""
        if not self.cycle_momentum:
            return None
        if self._in_cycle():
            return self.max_mom - (self.max_mom - self.min_mom) * self._cycle_position()
        if self.skip_mom_decay:
            return self.max_mom
        return self.max_mom * (1.0 + self.decay_mom_rate * self._decay_interval())

    def _apply(self):
        super()._apply()
        momentum = self.get_mom()
        if momentum is not None:
            for group in self.optimizer.param_groups:
                group["betas"] = (momentum, *tuple(group["betas"])[1:])


_OUR_SCHEDULES = {
    LR_RANGE_TEST: LRRangeTest,
    ONE_CYCLE: OneCycle,
    WARMUP_LR: WarmupLR,
    WARMUP_DECAY_LR: WarmupDecayLR,
    WARMUP_COSINE_LR: WarmupCosineLR,
}


def _torch_schedule_class(name):
    cls = getattr(torch.optim.lr_scheduler, name, None)
    if inspect.isclass(cls) and (issubclass(cls, torch.optim.lr_scheduler.LRScheduler)
                                 or cls is torch.optim.lr_scheduler.ReduceLROnPlateau):
        return cls
    return None


def _check_schedule_keys(name, cls, params):
    """Reject unknown keys and report missing required ones, naming the config path."""
    signature = inspect.signature(cls.__init__)
    arguments = [p for p in signature.parameters.values() if p.name not in ("self", "optimizer")]
    if any(p.kind == p.VAR_KEYWORD for p in arguments):
        return
    accepted = [p.name for p in arguments if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in params:
        if key not in accepted:
            raise ValueError(f"scheduler.params.{key} is not accepted by {name}; accepted keys: {', '.join(accepted)}")
    for p in arguments:
        if p.default is p.empty and p.kind != p.VAR_POSITIONAL and p.name not in params:
            raise ValueError(f"scheduler.params.{p.name} is required by {name}")


def build_lr_scheduler(name: str, params: dict, optimizer):
    """Build the learning-rate schedule named by a ``scheduler`` config section.

    Args:
        name: ``scheduler.type``: one of ``VALID_LR_SCHEDULES``, or the name of any
            ``torch.optim.lr_scheduler`` class (e.g. ``StepLR``), which is built as
            ``cls(optimizer, **params)``.
        params: ``scheduler.params`` (keyword arguments of the schedule); None means {}.
        optimizer: the optimizer to drive (torch schedules need a ``torch.optim.Optimizer``).

    Raises:
        ValueError: unknown name, unknown/missing key, or a bad value, naming
            ``scheduler.type`` or ``scheduler.params.<key>``.
    """
    if not isinstance(name, str):
        raise TypeError(f"scheduler.type must be a string, got {type(name).__name__}")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise TypeError(f"scheduler.params must be a dict, got {type(params).__name__}")
    cls = _OUR_SCHEDULES.get(name) or _torch_schedule_class(name)
    if cls is None:
        raise ValueError(f"scheduler.type '{name}' is not a known schedule; allowed: "
                         f"{', '.join(VALID_LR_SCHEDULES)} or any torch.optim.lr_scheduler class")
    _check_schedule_keys(name, cls, params)
    check_call_kwargs("scheduler.params", params, cls)
    try:
        return cls(optimizer, **params)
    except ScheduleParamError as err:
        raise ValueError(f"scheduler.params.{err.key} {err.detail}") from err
