"""Runtime helpers users call directly (``set_random_seed``, ``see_memory_usage``) and RNG state capture."""
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


def see_memory_usage(message: str, force: bool = False) -> None:
    """Log accelerator and host memory use on rank 0, then reset the accelerator's peak counters.

    Args:
        message: text printed before the figures (where in the program this is).
        force: log only when True (DeepSpeed's convention: calls sprinkled through code stay
            silent unless forced). Default False.

    Figures, in GB: MA (allocated now), Max_MA (peak allocated since the previous call), CA
    (reserved by the caching allocator), Max_CA (peak reserved), and the host's virtual memory
    use. On CPU the accelerator figures are the process's resident memory.
    """
    if not force:
        return
    import psutil

    from deepscale.utils.logging import log_dist

    accel = get_accelerator()
    gb = float(1 << 30)
    vm = psutil.virtual_memory()
    log_dist(f"{message} | MA {accel.memory_allocated() / gb:.2f} GB | Max_MA {accel.max_memory_allocated() / gb:.2f} "
             f"GB | CA {accel.memory_reserved() / gb:.2f} GB | Max_CA {accel.max_memory_reserved() / gb:.2f} GB | "
             f"CPU Virtual Memory: used = {(vm.total - vm.available) / gb:.2f} GB, percent = {vm.percent}%",
             ranks=[0])
    accel.reset_peak_memory_stats()
