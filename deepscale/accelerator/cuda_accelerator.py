"""The CUDA accelerator: a thin face over ``torch.cuda`` with NCCL as the backend."""
import torch

from deepscale.accelerator.abstract_accelerator import Accelerator


class CUDAAccelerator(Accelerator):
    """NVIDIA GPUs through ``torch.cuda``."""

    _name = "cuda"
    _communication_backend_name = "nccl"

    def current_device(self):
        return torch.cuda.current_device()

    def set_device(self, device_index) -> None:
        torch.cuda.set_device(device_index)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def synchronize(self, device_index=None) -> None:
        torch.cuda.synchronize(device_index)

    def manual_seed(self, seed: int) -> None:
        torch.cuda.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.cuda.manual_seed_all(seed)

    def get_rng_state(self, device_index=None) -> torch.Tensor:
        return torch.cuda.get_rng_state(device_index if device_index is not None else "cuda")

    def set_rng_state(self, new_state, device_index=None) -> None:
        torch.cuda.set_rng_state(new_state, device_index if device_index is not None else "cuda")

    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def is_fp16_supported(self) -> bool:
        return torch.cuda.is_available()

    def memory_allocated(self, device_index=None) -> int:
        return torch.cuda.memory_allocated(device_index)

    def max_memory_allocated(self, device_index=None) -> int:
        return torch.cuda.max_memory_allocated(device_index)

    def reset_peak_memory_stats(self, device_index=None) -> None:
        torch.cuda.reset_peak_memory_stats(device_index)

    def memory_reserved(self, device_index=None) -> int:
        return torch.cuda.memory_reserved(device_index)

    def max_memory_reserved(self, device_index=None) -> int:
        return torch.cuda.max_memory_reserved(device_index)

    def memory_stats(self, device_index=None) -> dict:
        return torch.cuda.memory_stats(device_index)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def total_memory(self, device_index=None) -> int:
        index = self.current_device() if device_index is None else device_index
        return torch.cuda.get_device_properties(index).total_memory

    def available_memory(self, device_index=None) -> int:
        free, _total = torch.cuda.mem_get_info(device_index)
        return free

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        return tensor.pin_memory()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def Stream(self, *args, **kwargs):
        return torch.cuda.Stream(*args, **kwargs)

    def Event(self, *args, **kwargs):
        return torch.cuda.Event(*args, **kwargs)

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def current_stream(self, device_index=None):
        return torch.cuda.current_stream(device_index)

    def default_stream(self, device_index=None):
        return torch.cuda.default_stream(device_index)

    def range_push(self, msg: str) -> None:
        torch.cuda.nvtx.range_push(msg)

    def range_pop(self) -> None:
        torch.cuda.nvtx.range_pop()
