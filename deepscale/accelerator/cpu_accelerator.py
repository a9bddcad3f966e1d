"""The CPU accelerator: streams and events are no-ops, the backend is gloo."""
import contextlib
import os

import psutil
import torch

from deepscale.accelerator.abstract_accelerator import Accelerator


class _NoOpStream:
    """Stands in for a device stream on CPU, where all work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        return None

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _NoOpEvent()

    def query(self):
        return True


class _NoOpEvent:
    """Stands in for a device event on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_process = None


def _this_process():
    """A cached ``psutil.Process`` of this process (re-made after a fork).

    Building one reads /proc/<pid>/stat, which takes milliseconds in a busy process with many
    threads; the monitors read the RSS every training step.
    """
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process


class CPUAccelerator(Accelerator):
    """Runs everything on host memory and cores; one "device" per local rank."""

    _name = "cpu"
    _communication_backend_name = "gloo"

    def __init__(self):
        self._current = 0

    def device_name(self, device_index=None) -> str:
        # CPU tensors have no per-device index: ``cpu:1`` and ``cpu`` are the same memory.
        return "cpu"

    def is_synchronized_device(self) -> bool:
        return True

    def current_device(self):
        return self._current

    def set_device(self, device_index) -> None:
        self._current = int(device_index) if device_index is not None else 0

    def device_count(self) -> int:
        """``LOCAL_SIZE`` from the launcher when set, else 1."""
        return int(os.environ.get("LOCAL_SIZE", "1"))

    def is_available(self) -> bool:
        return True

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, device_index=None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, new_state, device_index=None) -> None:
        torch.set_rng_state(new_state)

    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        # Half-precision matmuls run on CPU in recent torch releases, if slowly.
        return True

    def memory_allocated(self, device_index=None) -> int:
        """Resident set size of this process: the closest CPU analogue of allocated bytes."""
        return _this_process().memory_info().rss

    def max_memory_allocated(self, device_index=None) -> int:
        """Peak resident set size of this process (``ru_maxrss``)."""
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak_memory_stats(self, device_index=None) -> None:
        # The kernel keeps the peak RSS; it cannot be reset from user space.
        return None

    def total_memory(self, device_index=None) -> int:
        return psutil.virtual_memory().total

    def available_memory(self, device_index=None) -> int:
        return psutil.virtual_memory().available

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        # Pinning only matters for host-to-device copies; with no device it would only cost.
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned() if torch.cuda.is_available() else False

    def Stream(self, *args, **kwargs):
        return _NoOpStream()

    def Event(self, *args, **kwargs):
        return _NoOpEvent()

    def stream(self, stream):
        return contextlib.nullcontext()

    def current_stream(self, device_index=None):
        return _NoOpStream()

    def default_stream(self, device_index=None):
        return _NoOpStream()
