"""Batch-size arithmetic: one source of truth for the batch triad.

Note: the three batch keys are tied by

    train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp_world_size

Any two of them determine the third. With only ``train_batch_size`` the
accumulation steps default to 1; with only the micro batch, likewise. Giving
neither ``train_batch_size`` nor ``train_micro_batch_size_per_gpu`` leaves the
global batch unknown and is an error. Every error message shows the numbers
involved so the fix is obvious.
"""
from typing import Optional, Tuple

TBS = "train_batch_size"
MBS = "train_micro_batch_size_per_gpu"
GAS = "gradient_accumulation_steps"
DP = "data-parallel size"


def check_dp_world_size(dp_world_size) -> int:
    """Validate the data-parallel world size argument and return it."""
    if isinstance(dp_world_size, bool) or not isinstance(dp_world_size, int):
        raise TypeError(f"dp_world_size must be an int >= 1, got {dp_world_size!r} "
                        f"({type(dp_world_size).__name__})")
    if dp_world_size < 1:
        raise ValueError(f"dp_world_size must be >= 1, got {dp_world_size}")
    return dp_world_size


def _check_positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _divide(numerator: int, num_name: str, factors: Tuple[Tuple[str, int], ...], target: str) -> int:
    """``numerator / prod(factors)``, or a ValueError that shows the arithmetic."""
    denominator = 1
    for _, value in factors:
        denominator *= value
    if numerator % denominator != 0:
        product = " * ".join(f"{name} ({value})" for name, value in factors)
        raise ValueError(f"{num_name} ({numerator}) is not divisible by {product} = {denominator}, "
                         f"so {target} cannot be derived; adjust {num_name} or the other values")
    return numerator // denominator


def resolve_batch_sizes(train_batch_size: Optional[int], micro_batch_per_gpu: Optional[int],
                        grad_accum_steps: Optional[int], dp_world_size: int = 1) -> Tuple[int, int, int]:
    """Fill in the missing members of the batch triad and check consistency.

    Args:
        train_batch_size: global batch per optimizer step, or None.
        micro_batch_per_gpu: batch per forward/backward on one data-parallel rank, or None.
        grad_accum_steps: micro-batches accumulated per optimizer step, or None.
        dp_world_size: number of data-parallel ranks. Default 1.

    Returns:
        ``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``
        as plain ints.

    Raises:
        ValueError: a value is < 1, the values disagree, a division leaves a
            remainder, or neither ``train_batch_size`` nor
            ``train_micro_batch_size_per_gpu`` is given.
    """
    dp = check_dp_world_size(dp_world_size)
    tbs, mbs, gas = train_batch_size, micro_batch_per_gpu, grad_accum_steps
    for name, value in ((TBS, tbs), (MBS, mbs), (GAS, gas)):
        _check_positive(name, value)

    if tbs is None and mbs is None:
        given = f" (only {GAS}={gas} was given)" if gas is not None else ""
        raise ValueError(f"Cannot determine the batch size{given}: set {TBS} or {MBS} "
                         f"(or both); for example \"{MBS}\": 1")
    if tbs is not None and mbs is not None and gas is not None:
        if tbs != mbs * gas * dp:
            raise ValueError(f"{TBS} ({tbs}) != {MBS} ({mbs}) * {GAS} ({gas}) * {DP} ({dp}) = "
                             f"{mbs * gas * dp}; fix one of them or leave one out to have it derived")
        return tbs, mbs, gas
    if tbs is not None and mbs is not None:
        return tbs, mbs, _divide(tbs, TBS, ((MBS, mbs), (DP, dp)), GAS)
    if tbs is not None:
        gas = 1 if gas is None else gas
        return tbs, _divide(tbs, TBS, ((GAS, gas), (DP, dp)), MBS), gas
    gas = 1 if gas is None else gas
    return mbs * gas * dp, mbs, gas
