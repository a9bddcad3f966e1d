"""The compiled CUDA attention kernel (op ``flash_attn``) behind an autograd Function.

Kernels: csrc/attention/cuda (tensor-core mma.sync for sm80 and sm90). They take packed
varlen tensors ``[total, heads, head_dim]`` in bf16/fp16 with int32 sequence offsets on the
device; a padded batch is passed as its packed view. Forward stores the log-sum-exp; backward
recomputes the probabilities block by block and accumulates dK/dV per query head in fp32
(reduced over each GQA group here).
"""
import torch
from torch.autograd.function import once_differentiable

SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def unsupported_reason(q, spec):
    """Why the CUDA kernel cannot run this call (empty string when it can)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the CUDA kernel takes bfloat16/float16, not {q.dtype}"
    if spec.head_dim not in SUPPORTED_HEAD_DIMS or spec.head_dim_v != spec.head_dim:
        return f"the CUDA kernel takes head dims {SUPPORTED_HEAD_DIMS} (equal for q and v), not {spec.head_dim}"
    if spec.dropout_p > 0:
        return "dropout_p > 0 is run by the PyTorch path (the kernels do not drop weights)"
    major, _ = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"the CUDA kernel needs sm80 or newer, this GPU is sm{major}x"
    return ""


def _packed(t):
    return t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous()


def _offsets(values, device):
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


class FlashAttentionFunction(torch.autograd.Function):
    """``(out, lse) = f(q, k, v)`` on the CUDA kernel; lse is float32 ``[heads, total_q]``."""

    @staticmethod
    def forward(ctx, q, k, v, spec, op):
        qp, kp, vp = _packed(q), _packed(k), _packed(v)
        cu_q, cu_k = _offsets(spec.cu_q, q.device), _offsets(spec.cu_k, q.device)
        out = torch.empty_like(qp)
        lse = torch.empty(spec.num_heads, qp.shape[0], dtype=torch.float32, device=q.device)
        op.forward(qp, kp, vp, out, lse, cu_q, cu_k, spec.max_q, spec.max_k, spec.scale, spec.softcap, spec.left,
                   spec.right)
        ctx.save_for_backward(qp, kp, vp, out, lse, cu_q, cu_k)
        ctx.spec, ctx.op, ctx.shapes = spec, op, (q.shape, k.shape, v.shape)
        ctx.mark_non_differentiable(lse)
        return out.view(q.shape), lse

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, dout, _dlse):
        qp, kp, vp, out, lse, cu_q, cu_k = ctx.saved_tensors
        spec = ctx.spec
        dout = _packed(dout.to(qp.dtype))
        dq = torch.zeros(qp.shape, dtype=torch.float32, device=qp.device)  # atomically accumulated
        dk = torch.zeros(kp.shape[0], spec.num_heads, spec.head_dim, dtype=torch.float32, device=qp.device)
        dv = torch.zeros_like(dk)
        ctx.op.backward(qp, kp, vp, out, dout, lse, dq, dk, dv, cu_q, cu_k, spec.max_q, spec.max_k, spec.scale,
                        spec.softcap, spec.left, spec.right)
        shape = (kp.shape[0], spec.num_kv_heads, spec.group, spec.head_dim)
        dk = dk.view(shape).sum(dim=2).to(kp.dtype)
        dv = dv.view(shape).sum(dim=2).to(vp.dtype)
        q_shape, k_shape, v_shape = ctx.shapes
        return dq.to(qp.dtype).view(q_shape), dk.view(k_shape), dv.view(v_shape), None, None


def flash_attention(q, k, v, spec, op):
    """Run the CUDA kernel; returns ``(out, lse)`` (out differentiable, laid out like ``q``)."""
    return FlashAttentionFunction.apply(q, k, v, spec, op)
