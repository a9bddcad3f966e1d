"""The compiled CPU attention kernel (op ``cpu_attention``) behind an autograd Function.

The library is plain C (loaded with ctypes); this module declares its entry points, packs the
problem's Python-int metadata into int64 arrays once per call, and keeps the forward's
log-sum-exp for the backward, which recomputes the probabilities block by block.
"""
import ctypes

import torch
from torch.autograd.function import once_differentiable

_P, _I, _D = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
_I64P = ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {
    "ds_attn_forward": (_I, [_P, _P, _P, _P, _P, _I64P, _I64P, _I64P, _I64P, _I, _D, _D, _I]),
    "ds_attn_backward": (_I, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I64P, _I64P, _I64P, _I64P, _I, _D, _D, _I, _I]),
    "ds_last_error": (ctypes.c_char_p, []),
}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
HEAD_DIM_MULTIPLE = 16
MAX_HEAD_DIM = 256


def bind(lib):
    """Declare the argument types of the attention entry points on ``lib``; returns ``lib``."""
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def unsupported_reason(q, spec):
    """Why the CPU kernel cannot run this call (empty string when it can)."""
    if q.dtype not in DTYPE_CODES:
        return f"the CPU kernel takes float32/bfloat16/float16, not {q.dtype}"
    if spec.head_dim % HEAD_DIM_MULTIPLE or spec.head_dim > MAX_HEAD_DIM:
        return f"the CPU kernel takes head dims that are multiples of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}, " \
               f"not {spec.head_dim}"
    if spec.head_dim_v != spec.head_dim:
        return f"the CPU kernel needs v's head dim ({spec.head_dim_v}) equal to q's ({spec.head_dim})"
    if spec.dropout_p > 0:
        return "dropout_p > 0 is run by the PyTorch path (the kernels do not drop weights)"
    return ""


def _arrays(spec, rows):
    i64 = ctypes.c_int64
    cu_q = (i64 * len(spec.cu_q))(*spec.cu_q)
    cu_k = (i64 * len(spec.cu_k))(*spec.cu_k)
    dims = (i64 * 6)(spec.batch, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.left, spec.right)
    strides = (i64 * 4)(*rows)
    return cu_q, cu_k, dims, strides


def _packed(t):
    return t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous()


def _check(lib, rc, what):
    if rc != 0:
        raise RuntimeError(f"cpu_attention {what} failed: {lib.ds_last_error().decode(errors='replace')}")


class CPUAttentionFunction(torch.autograd.Function):
    """``(out, lse) = f(q, k, v)`` on the CPU kernel; lse is float32 ``[heads, total_q]``."""

    @staticmethod
    def forward(ctx, q, k, v, spec, lib, num_threads):
        qp, kp, vp = _packed(q), _packed(k), _packed(v)
        out = torch.empty_like(qp)
        lse = torch.empty(spec.num_heads, qp.shape[0], dtype=torch.float32)
        rows = (qp.stride(0), kp.stride(0), vp.stride(0), out.stride(0))
        arrays = _arrays(spec, rows)
        rc = lib.ds_attn_forward(qp.data_ptr(), kp.data_ptr(), vp.data_ptr(), out.data_ptr(), lse.data_ptr(), *arrays,
                                 DTYPE_CODES[q.dtype], spec.scale, spec.softcap, num_threads)
        _check(lib, rc, "forward")
        ctx.save_for_backward(qp, kp, vp, out, lse)
        ctx.spec, ctx.lib, ctx.num_threads = spec, lib, num_threads
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.mark_non_differentiable(lse)
        return out.view(q.shape), lse

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, dout, _dlse):
        qp, kp, vp, out, lse = ctx.saved_tensors
        spec, lib = ctx.spec, ctx.lib
        dout = _packed(dout.to(qp.dtype))
        dq = torch.zeros_like(qp)
        expanded = spec.group > 1
        if expanded:  # fp32 partial sums per query head, reduced over each group below
            dk = torch.zeros(kp.shape[0], spec.num_heads, spec.head_dim, dtype=torch.float32)
            dv = torch.zeros_like(dk)
        else:
            dk, dv = torch.zeros_like(kp), torch.zeros_like(vp)
        arrays = _arrays(spec, (qp.stride(0), kp.stride(0), vp.stride(0), out.stride(0)))
        rc = lib.ds_attn_backward(qp.data_ptr(), kp.data_ptr(), vp.data_ptr(), out.data_ptr(), dout.data_ptr(),
                                  lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), *arrays,
                                  DTYPE_CODES[qp.dtype], spec.scale, spec.softcap, int(expanded), ctx.num_threads)
        _check(lib, rc, "backward")
        if expanded:
            shape = (kp.shape[0], spec.num_kv_heads, spec.group, spec.head_dim)
            dk = dk.view(shape).sum(dim=2).to(kp.dtype)
            dv = dv.view(shape).sum(dim=2).to(vp.dtype)
        q_shape, k_shape, v_shape = ctx.shapes
        return dq.view(q_shape), dk.view(k_shape), dv.view(v_shape), None, None, None


def cpu_attention(q, k, v, spec, lib, num_threads=None):
    """Run the CPU kernel; returns ``(out, lse)`` (out differentiable, laid out like ``q``)."""
    threads = num_threads or torch.get_num_threads()
    return CPUAttentionFunction.apply(q, k, v, spec, lib, threads)
