"""Tensor constructors inside ``zero.Init``: floating tensors are created in the Init dtype.

With ``zero.Init(dtype=torch.bfloat16)`` (or a config with bf16/fp16 enabled), DeepSpeed makes the
torch factory functions produce floating tensors in that dtype, so buffers a module builds in its
``__init__`` (rotary caches, masks) match the 16-bit parameters. ``partition_parameters`` looks the
wrapper up by its module-level name ``zero_wrapper_for_fp_tensor_constructor`` every time an Init
context is entered, so a caller may replace it there (Hugging Face transformers does, to keep
``torch.arange`` from being cast).
"""
import functools

import torch

# The originals, kept so wrappers (ours or a caller's) can recognise and restore them.
_orig_torch_empty = torch.empty
_orig_torch_zeros = torch.zeros
_orig_torch_ones = torch.ones
_orig_torch_full = torch.full
_orig_torch_arange = torch.arange

FP_CONSTRUCTORS = {"empty": _orig_torch_empty, "zeros": _orig_torch_zeros, "ones": _orig_torch_ones,
                   "full": _orig_torch_full, "arange": _orig_torch_arange}


def zero_wrapper_for_fp_tensor_constructor(fn, target_fp_dtype, target_device=None):
    """Wrap a torch factory ``fn`` so floating results come out in ``target_fp_dtype``.

    Args:
        fn: the original factory (``torch.empty``, ``torch.arange``, ...).
        target_fp_dtype: dtype for floating results created without an explicit ``dtype=``.
        target_device: device used when the call names none. Default None: torch's default.
    """
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if target_device is not None and kwargs.get("device") is None:
            kwargs["device"] = target_device
        tensor = fn(*args, **kwargs)
        if kwargs.get("dtype") is None and tensor.is_floating_point() and tensor.dtype != target_fp_dtype:
            tensor = tensor.to(target_fp_dtype)
        return tensor

    return wrapped


def patch_fp_constructors(make_wrapper, target_fp_dtype, target_device=None) -> dict:
    """Replace the torch factories with ``make_wrapper(original, dtype, target_device=...)``;
    returns what :func:`restore_fp_constructors` needs."""
    saved = {name: getattr(torch, name) for name in FP_CONSTRUCTORS}
    for name, original in FP_CONSTRUCTORS.items():
        setattr(torch, name, make_wrapper(original, target_fp_dtype, target_device=target_device))
    return saved


def restore_fp_constructors(saved: dict) -> None:
    """Undo :func:`patch_fp_constructors`."""
    for name, function in saved.items():
        setattr(torch, name, function)
