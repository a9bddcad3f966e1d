"""Runtime helpers users call directly (``set_random_seed``) and RNG state capture."""
import random

import numpy as np
import torch

from deepscale.accelerator import get_accelerator


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (host and accelerator) with ``seed``."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"set_random_seed: seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def get_rng_states() -> dict:
    """Every RNG state this process uses, for checkpoints."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        states["accelerator"] = accel.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Restore states captured by :func:`get_rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "accelerator" in states and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(states["accelerator"])
