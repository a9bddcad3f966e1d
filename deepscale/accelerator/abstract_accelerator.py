"""The accelerator interface every device implementation provides.

Method names follow the ones DeepSpeed users already call on ``get_accelerator()`` so
user code ports unchanged.
"""
import abc

import torch


class Accelerator(abc.ABC):
    """One device family (CPU, CUDA, ...) seen through a common set of methods."""

    _name: str = "abstract"
    _communication_backend_name: str = "gloo"

    # --- identity -------------------------------------------------------------------------
    def device_name(self, device_index=None) -> str:
        """``'cuda'`` or ``'cuda:i'`` style name; the bare name when ``device_index`` is None."""
        if device_index is None:
            return self._name
        return f"{self._name}:{device_index}"

    def current_device_name(self) -> str:
        """Name of the device this process uses, e.g. ``'cuda:1'`` or ``'cpu'``."""
        return self.device_name(self.current_device())

    def device(self, device_index=None) -> torch.device:
        """A ``torch.device`` for ``device_index`` (current device when None)."""
        return torch.device(self.device_name(device_index))

    def communication_backend_name(self) -> str:
        """The torch.distributed backend that suits this device (gloo, nccl)."""
        return self._communication_backend_name

    def is_synchronized_device(self) -> bool:
        """True when work on this device runs synchronously with the host."""
        return False

    # --- device management ----------------------------------------------------------------
    @abc.abstractmethod
    def current_device(self): ...

    @abc.abstractmethod
    def set_device(self, device_index) -> None: ...

    @abc.abstractmethod
    def device_count(self) -> int: ...

    @abc.abstractmethod
    def is_available(self) -> bool: ...

    @abc.abstractmethod
    def synchronize(self, device_index=None) -> None: ...

    # --- RNG ------------------------------------------------------------------------------
    @abc.abstractmethod
    def manual_seed(self, seed: int) -> None: ...

    @abc.abstractmethod
    def manual_seed_all(self, seed: int) -> None: ...

    @abc.abstractmethod
    def get_rng_state(self, device_index=None) -> torch.Tensor: ...

    @abc.abstractmethod
    def set_rng_state(self, new_state, device_index=None) -> None: ...

    def initial_seed(self) -> int:
        return torch.initial_seed()

    # --- dtypes ---------------------------------------------------------------------------
    @abc.abstractmethod
    def is_bf16_supported(self) -> bool: ...

    @abc.abstractmethod
    def is_fp16_supported(self) -> bool: ...

    def supported_dtypes(self):
        dtypes = [torch.float32]
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return dtypes

    # --- memory ---------------------------------------------------------------------------
    @abc.abstractmethod
    def memory_allocated(self, device_index=None) -> int: ...

    @abc.abstractmethod
    def max_memory_allocated(self, device_index=None) -> int: ...

    @abc.abstractmethod
    def reset_peak_memory_stats(self, device_index=None) -> None: ...

    @abc.abstractmethod
    def total_memory(self, device_index=None) -> int: ...

    @abc.abstractmethod
    def available_memory(self, device_index=None) -> int: ...

    def memory_reserved(self, device_index=None) -> int:
        return self.memory_allocated(device_index)

    def max_memory_reserved(self, device_index=None) -> int:
        return self.max_memory_allocated(device_index)

    def reset_max_memory_allocated(self, device_index=None) -> None:
        self.reset_peak_memory_stats(device_index)

    def empty_cache(self) -> None:
        return None

    def memory_stats(self, device_index=None) -> dict:
        return {
            "allocated_bytes.all.current": self.memory_allocated(device_index),
            "allocated_bytes.all.peak": self.max_memory_allocated(device_index),
        }

    # --- host memory ----------------------------------------------------------------------
    @abc.abstractmethod
    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor: ...

    @abc.abstractmethod
    def is_pinned(self, tensor: torch.Tensor) -> bool: ...

    # --- streams and events ---------------------------------------------------------------
    @abc.abstractmethod
    def Stream(self, *args, **kwargs): ...

    @abc.abstractmethod
    def Event(self, *args, **kwargs): ...

    @abc.abstractmethod
    def stream(self, stream): ...

    @abc.abstractmethod
    def current_stream(self, device_index=None): ...

    @abc.abstractmethod
    def default_stream(self, device_index=None): ...

    # --- misc -----------------------------------------------------------------------------
    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self._name

    def lazy_call(self, callback):
        callback()

    def range_push(self, msg: str) -> None:
        return None

    def range_pop(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self._name!r}, backend={self._communication_backend_name!r})"
