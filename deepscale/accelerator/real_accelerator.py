"""Chooses the accelerator for this process, once.

``DEEPSCALE_ACCELERATOR=cpu|cuda`` overrides the automatic choice (CUDA when torch sees
a GPU, else CPU).
"""
import os

from deepscale.accelerator.abstract_accelerator import Accelerator

SUPPORTED_ACCELERATORS = ("cpu", "cuda")
_accelerator = None


def _build(name: str) -> Accelerator:
    if name == "cuda":
        from deepscale.accelerator.cuda_accelerator import CUDAAccelerator
        return CUDAAccelerator()
    from deepscale.accelerator.cpu_accelerator import CPUAccelerator
    return CPUAccelerator()


def _detect() -> str:
    override = os.environ.get("DEEPSCALE_ACCELERATOR")
    if override:
        name = override.strip().lower()
        if name not in SUPPORTED_ACCELERATORS:
            raise ValueError(
                f"DEEPSCALE_ACCELERATOR={override!r} is not supported; allowed values: "
                f"{', '.join(SUPPORTED_ACCELERATORS)}")
        if name == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "DEEPSCALE_ACCELERATOR=cuda but torch sees no CUDA device; install a CUDA build "
                    "of torch or set DEEPSCALE_ACCELERATOR=cpu")
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_accelerator() -> Accelerator:
    """The accelerator of this process (CPU or CUDA), created on first use."""
    global _accelerator
    if _accelerator is None:
        _accelerator = _build(_detect())
    return _accelerator


def set_accelerator(accelerator: Accelerator) -> None:
    """Replace the process-wide accelerator (tests and custom devices)."""
    global _accelerator
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"set_accelerator expects an Accelerator instance, got {type(accelerator).__name__}")
    _accelerator = accelerator


def is_current_accelerator_supported() -> bool:
    return get_accelerator()._name in SUPPORTED_ACCELERATORS
