"""Peak dense FLOPS of the accelerator, for MFU (model FLOPs utilisation).

Vendor datasheet figures without sparsity, per device. ``DEEPSCALE_PEAK_TFLOPS`` (a number, in
TFLOPS) overrides the table, and is the only source on devices it does not list (CPUs
included): without either, the report leaves MFU out rather than guess.
"""
import os
from typing import Optional

import torch

PEAK_TFLOPS_ENV = "DEEPSCALE_PEAK_TFLOPS"

# (substring of torch.cuda.get_device_name(), {compute dtype: dense TFLOPS}); first match wins,
# so the more specific names come first. "tf32" applies to fp32 models with TF32 matmuls on.
_TABLE = (
    ("H100 PCIe", {"16bit": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"16bit": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"16bit": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"16bit": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"16bit": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("V100", {"16bit": 125.0, "fp32": 15.7}),
)


def _compute_kind(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device_name: Optional[str], dtype: torch.dtype) -> Optional[float]:
    """Peak FLOPS (operations per second) for ``dtype`` matmuls on ``device_name``, or None if unknown.

    Args:
        device_name: e.g. ``"NVIDIA H100 80GB HBM3"``; None for a CPU.
        dtype: the model's compute dtype.
    """
    override = os.environ.get(PEAK_TFLOPS_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"{PEAK_TFLOPS_ENV} must be a number of TFLOPS, got {override!r}") from None
        if value <= 0:
            raise ValueError(f"{PEAK_TFLOPS_ENV} must be positive, got {override!r}")
        return value * 1e12
    if not device_name:
        return None
    for key, peaks in _TABLE:
        if key in device_name:
            tflops = peaks.get(_compute_kind(dtype))
            return tflops * 1e12 if tflops else None
    return None


def current_device_name() -> Optional[str]:
    """The CUDA device's name, or None when running on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None
