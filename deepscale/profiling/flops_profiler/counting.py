"""Floating-point operation counts of aten operators, taken at the PyTorch dispatcher.

Note: why the dispatcher. DeepSpeed's profiler replaces ``torch.nn.functional`` functions and a
few tensor methods with counting wrappers while it runs. That sees only the forward calls that
go through the patched names (not ``x @ w``, not backward kernels), counts checkpoint
recomputation as extra forwards, and has to restore every patched name afterwards. Here a
``TorchDispatchMode`` (the mechanism of ``torch.utils.flop_counter.FlopCounterMode``) sees every
aten operator that actually runs, forward, backward and recomputation alike, whatever Python
spelling produced it, and patches nothing: leaving the mode is the whole clean-up.

Two classes of operators are counted:

* **matmul**: matrix products, convolutions and attention kernels, with the formulas of
  ``torch.utils.flop_counter`` (so this class equals ``FlopCounterMode``'s total where both know
  the operator), plus the CPU fused attention kernels that table does not list. One MAC = 2 flops.
* **other**: normalisation, softmax, activations, element-wise arithmetic and reductions, at the
  per-element costs DeepSpeed's profiler uses in the forward (one flop per output element;
  layer/batch/group norm 5 with an affine weight, else 4; softmax 1 per element; pooling 1 per
  input element; interpolation 1 per output element); backward
  kernels of norms and softmax are counted at twice their forward. These carry no MACs.

Copies, views, masks, comparisons, indexing (embedding lookups) and random numbers are free.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.utils import flop_counter as _torch_flops
from torch.utils._python_dispatch import TorchDispatchMode

from deepscale.utils.logging import logger

_aten = torch.ops.aten


def _shape(t):
    return tuple(t.shape)


def _cpu_sdpa_forward(query, key, value, *args, **kwargs) -> int:
    return _torch_flops.sdpa_flop_count(_shape(query), _shape(key), _shape(value))


def _cpu_sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return _torch_flops.sdpa_backward_flop_count(_shape(grad_out), _shape(query), _shape(key), _shape(value))


def _matmul_formulas() -> Dict[object, Callable]:
    """Overload packet -> ``f(*args, out_val=..., **kwargs) -> flops`` for the matmul class."""
    table = dict(_torch_flops.flop_registry)
    # torch's table has the CUDA fused attention kernels but not the CPU ones (its counter
    # reports 0 for F.scaled_dot_product_attention on CPU).
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward)):
        packet = getattr(_aten, name, None)
        if packet is not None and packet not in table:
            table[packet] = (lambda f: (lambda *a, out_val=None, **k: f(*a, **k)))(formula)
    return table


MATMUL_FORMULAS = _matmul_formulas()
# Matmul-class ops that also add a bias (beta * input): its additions go to the "other" class.
_BIAS_ADDING = {_aten.addmm, _aten.baddbmm}


def _numel(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].numel()
    return 0


def _norm(input_pos: int, weight_pos: int, factor: int):
    """A normalisation costs 5 flops per element with an affine weight, else 4 (DeepSpeed's
    forward convention), times ``factor`` (2 for backward kernels)."""
    def formula(*args, **kwargs) -> int:
        weight = args[weight_pos] if len(args) > weight_pos else kwargs.get("weight")
        return factor * args[input_pos].numel() * (5 if isinstance(weight, torch.Tensor) else 4)
    return formula


def _per_input_element(factor: int):
    return lambda input, *args, **kwargs: factor * input.numel() if isinstance(input, torch.Tensor) else 0


def _other_formulas() -> Dict[object, Callable]:
    """Overload packet -> ``f(*args, **kwargs) -> flops`` for non-pointwise ops of the "other" class."""
    table = {}
    spec = {
        # Argument positions of (input, weight) in each aten signature.
        "native_layer_norm": _norm(0, 2, 1), "native_batch_norm": _norm(0, 1, 1), "native_group_norm": _norm(0, 1, 1),
        "_native_batch_norm_legit": _norm(0, 1, 1), "_native_batch_norm_legit_no_training": _norm(0, 1, 1),
        "native_layer_norm_backward": _norm(1, 5, 2), "native_group_norm_backward": _norm(1, 4, 2),
        "native_batch_norm_backward": _norm(1, 2, 2),
        "_fused_rms_norm": _per_input_element(4), "_fused_rms_norm_backward": _per_input_element(8),
        "_softmax": _per_input_element(1), "_log_softmax": _per_input_element(1),
        "_softmax_backward_data": _per_input_element(2), "_log_softmax_backward_data": _per_input_element(2),
        "sum": _per_input_element(1), "mean": _per_input_element(1), "var_mean": _per_input_element(2),
        "var": _per_input_element(2), "norm": _per_input_element(2), "linalg_vector_norm": _per_input_element(2),
        # Pooling: one per input element (DeepSpeed's convention).
        **{name: _per_input_element(1) for name in (
            "max_pool1d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d",
            "avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool2d",
            "adaptive_max_pool3d")},
    }
    for name, formula in spec.items():
        packet = getattr(_aten, name, None)
        if packet is not None:
            table[packet] = formula
    return table


OTHER_FORMULAS = _other_formulas()
# Interpolation: one per output element.
_OUTPUT_SIZED = {getattr(_aten, n) for n in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                                             "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
                                             "upsample_trilinear3d", "_upsample_nearest_exact2d")
                 if hasattr(_aten, n)}
# Pointwise-tagged operators that move or select data rather than compute.
_FREE_POINTWISE = {getattr(_aten, n) for n in ("clone", "where", "masked_fill", "masked_fill_", "lift_fresh_copy",
                                               "copy", "_to_copy", "bernoulli", "bernoulli_", "fill", "fill_",
                                               "native_dropout_backward", "positive", "sign", "signbit",
                                               "nan_to_num", "nan_to_num_", "zero_", "isnan", "isinf")
                   if hasattr(_aten, n)}
_POINTWISE_CACHE: Dict[object, bool] = {}


def _is_counted_pointwise(func) -> bool:
    cached = _POINTWISE_CACHE.get(func)
    if cached is None:
        cached = torch.Tag.pointwise in func.tags and func._overloadpacket not in _FREE_POINTWISE
        _POINTWISE_CACHE[func] = cached
    return cached


def op_flops(func, args, kwargs, out) -> Tuple[int, int, int]:
    """``(matmul flops, MACs, other flops)`` of one aten call ``func(*args, **kwargs) -> out``."""
    packet = func._overloadpacket
    formula = MATMUL_FORMULAS.get(packet)
    if formula is not None:
        flops = int(formula(*args, **kwargs, out_val=out))
        bias = _numel(out) if packet in _BIAS_ADDING else 0
        return flops, flops // 2, bias
    formula = OTHER_FORMULAS.get(packet)
    if formula is not None:
        return 0, 0, int(formula(*args, **kwargs))
    if packet in _OUTPUT_SIZED:
        return 0, 0, _numel(out)
    if _is_counted_pointwise(func):
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and first.is_floating_point():
            return 0, 0, first.numel()
    return 0, 0, 0


_warmed_up = False


def warm_up_dispatch() -> None:
    """Run one operator under a throwaway mode: the first dispatch to a Python mode imports
    ``torch._dynamo`` (about a second), which must not land in the first profiled module's latency."""
    global _warmed_up
    if not _warmed_up:
        with OpCounter(lambda *args: None):
            torch.zeros(1).add_(1)
        _warmed_up = True


class OpCounter(TorchDispatchMode):
    """Runs every aten operator and reports its cost to ``sink(func, matmul_flops, macs, other_flops)``.

    Only operators with a nonzero cost reach the sink. Entering and leaving the mode is the
    whole installation: no Python function is replaced.
    """

    def __init__(self, sink: Callable[[object, int, int, int], None]):
        super().__init__()
        self._sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs: Optional[dict] = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            matmul, macs, other = op_flops(func, args, kwargs, out)
        except Exception as err:  # a formula that cannot read these arguments must not break training
            _warn_once(func, err)
            return out
        if matmul or other:
            self._sink(func, matmul, macs, other)
        return out


_WARNED = set()


def _warn_once(func, err: Exception) -> None:
    if func not in _WARNED:
        _WARNED.add(func)
        logger.warning(f"flops profiler: could not count {func} ({type(err).__name__}: {err}); counted as 0")
