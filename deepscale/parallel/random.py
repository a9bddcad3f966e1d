"""Named random-number-generator states for model parallelism, on any accelerator.

Note: why a tracker. With tensor parallelism, dropout inside a split layer must draw
different masks on each model-parallel rank (each rank holds a different slice of the
activation), while dropout outside it must draw the same mask on every rank. The tracker keeps
extra generator states by name; ``with tracker.fork(): ...`` swaps one in for the body and swaps
it back after, so the default stream is untouched. The idea follows Megatron-LM (Shoeybi et al.
2019). States are those of ``deepscale.accelerator``'s device: the CPU generator on CPU, the
current CUDA device's generator on GPU. Activation checkpointing saves and restores all of them
so that a recomputed forward draws exactly the same masks.
"""
import contextlib
from typing import Dict, Optional

import torch

from deepscale.accelerator import get_accelerator

MODEL_PARALLEL_RNG_NAME = "model-parallel-rng"
# Added to the user's seed so the model-parallel stream never equals the default one.
_MODEL_PARALLEL_SEED_OFFSET = 2718


class RNGStatesTracker:
    """A set of named generator states of the accelerator's default device."""

    def __init__(self):
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def reset(self) -> None:
        """Forget every named state."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of the name -> state map (what activation checkpointing saves)."""
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        """Replace the named states (e.g. with what :meth:`get_states` returned)."""
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Create the state ``name`` seeded with ``seed`` without disturbing the current stream.

        Raises:
            ValueError: ``name`` or ``seed`` is already used.
        """
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker: seed {seed} is already used by another state")
        if name in self.states_:
            raise ValueError(f"RNG tracker: a state named {name!r} already exists")
        self.seeds_.add(seed)
        accel = get_accelerator()
        current = accel.get_rng_state()
        accel.manual_seed(seed)
        self.states_[name] = accel.get_rng_state()
        accel.set_rng_state(current)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_NAME):
        """Run the body on the state ``name``; the state advances, the default stream does not.

        Raises:
            ValueError: no state named ``name`` (call :func:`model_parallel_cuda_manual_seed`).
        """
        if name not in self.states_:
            raise ValueError(f"RNG tracker: no state named {name!r}; seed it first with "
                             "model_parallel_cuda_manual_seed(seed) or tracker.add(name, seed)")
        accel = get_accelerator()
        outside = accel.get_rng_state()
        accel.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = accel.get_rng_state()
            accel.set_rng_state(outside)


_TRACKER = RNGStatesTracker()


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (the name is DeepSpeed's; it works on every accelerator)."""
    return _TRACKER


def model_parallel_cuda_manual_seed(seed: int, mpu=None) -> None:
    """Seed the default stream with ``seed`` and the model-parallel stream per rank.

    The default stream (used outside model-parallel regions) gets ``seed`` on every rank; the
    tracker's ``"model-parallel-rng"`` state gets ``seed + 2718 + model-parallel rank``.

    Args:
        seed: the base seed.
        mpu: object with ``get_model_parallel_rank()``. Default None: the parallel grid
            ``deepscale.initialize`` / ``build_parallel_grid`` registered, else rank 0.
    """
    rank = 0
    if mpu is None:
        from deepscale.parallel.grid import get_parallel_grid
        mpu = get_parallel_grid()
    if mpu is not None and hasattr(mpu, "get_model_parallel_rank"):
        rank = int(mpu.get_model_parallel_rank())
    _TRACKER.reset()
    get_accelerator().manual_seed(seed)
    _TRACKER.add(MODEL_PARALLEL_RNG_NAME, seed + _MODEL_PARALLEL_SEED_OFFSET + rank)


class RNGSnapshot:
    """Every generator state a recomputation must replay: CPU, the accelerator and the tracker.

    Args:
        include_device: also save the accelerator's generator (skipped on CPU, where it is the
            CPU generator). Default True.
    """

    def __init__(self, include_device: bool = True):
        accel = get_accelerator()
        self.cpu = torch.get_rng_state()
        self.device: Optional[torch.Tensor] = None
        if include_device and accel.device_name() != "cpu":
            self.device = accel.get_rng_state()
        self.tracker = _TRACKER.get_states()

    def restore(self) -> None:
        """Make the saved states current."""
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            get_accelerator().set_rng_state(self.device)
        _TRACKER.set_states(self.tracker)

    @contextlib.contextmanager
    def replay(self):
        """Run the body from the saved states, then put back the states found on entry."""
        here = RNGSnapshot(include_device=self.device is not None)
        self.restore()
        try:
            yield
        finally:
            here.restore()
