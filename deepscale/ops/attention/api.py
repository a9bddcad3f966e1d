"""``attention``: one call for fused attention on every device, and its module form."""
import torch

from deepscale.ops.attention import cpu_backend, cuda_backend, router, sdpa_backend
from deepscale.ops.attention.reference import reference_attention
from deepscale.ops.attention.spec import build_spec


def attention(q, k, v, causal=False, softmax_scale=None, window=None, softcap=None, cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, *, return_lse=False):
    """Scaled dot-product attention with FlashAttention's layout and options; forward and backward.

    Routes to deepscale's compiled kernel for the device (``cpu_attention`` on CPU, ``flash_attn``
    on CUDA), else to torch SDPA, else to an exact PyTorch reference; a fallback logs its
    reason once (see :func:`explain`).

    Args:
        q: queries ``[batch, seq_q, heads, head_dim]``, or packed ``[total_q, heads, head_dim]``
            when ``cu_seqlens_q`` is given.
        k, v: keys and values ``[batch, seq_k, kv_heads, head_dim]`` (packed: ``[total_k, ...]``).
            ``heads`` must be a multiple of ``kv_heads`` (GQA; MQA when ``kv_heads`` is 1).
        causal: hide keys after each query (aligned bottom-right when seq_q != seq_k). Default False.
        softmax_scale: score scale. Default ``head_dim ** -0.5``.
        window: sliding window: an int ``w`` (each query sees ``w`` keys back, and ``w`` ahead unless
            causal) or a ``(left, right)`` pair, ``-1`` for unbounded. Default None (no window).
        softcap: scores become ``softcap * tanh(scores / softcap)`` before masking. Default None.
        cu_seqlens_q, cu_seqlens_k: int32/int64 tensors (or lists) of ``batch + 1`` sequence
            offsets into the packed token axis. Default None (padded layout).
        max_seqlen_q, max_seqlen_k: longest sequences (Python ints; checked, and computed from
            the offsets when None). Default None.
        dropout_p: probability of dropping an attention weight; pass 0.0 at evaluation. Default 0.0.
        return_lse: also return the log-sum-exp of each query row, float32 ``[heads, total_q]``.
            Default False.

    Returns:
        The attention output, shaped like ``q`` (with v's head dim); with ``return_lse``, ``(out, lse)``.
    """
    spec = build_spec(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k, dropout_p=dropout_p)
    route = router.choose(q, spec)
    if route.backend == "cpu_attention":
        out, lse = cpu_backend.cpu_attention(q, k, v, spec, route.op)
    elif route.backend == "flash_attn":
        out, lse = cuda_backend.flash_attention(q, k, v, spec, route.op)
    elif route.backend == "sdpa" and not return_lse:
        return sdpa_backend.sdpa_attention(q, k, v, spec)
    else:
        out, lse = reference_attention(q, k, v, spec, return_lse=True)
        lse = lse.float()
    return (out, lse) if return_lse else out


def explain(q, k, v, **options):
    """The backend that :func:`attention` would use for these arguments, and why: a ``Route``."""
    return router.choose(q, build_spec(q, k, v, **options))


class FusedAttention(torch.nn.Module):
    """Module form of :func:`attention`; dropout applies in training mode only.

    Args:
        causal, softmax_scale, window, softcap: as in :func:`attention`.
        dropout_p: attention dropout in training. Default 0.0.
    """

    def __init__(self, causal=False, softmax_scale=None, window=None, softcap=None, dropout_p=0.0):
        super().__init__()
        self.causal, self.softmax_scale, self.window, self.softcap = causal, softmax_scale, window, softcap
        self.dropout_p = dropout_p

    def forward(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        """Attention of ``q`` over ``k``/``v`` (layouts as in :func:`attention`)."""
        return attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale, window=self.window,
                         softcap=self.softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                         dropout_p=self.dropout_p if self.training else 0.0)

    def extra_repr(self):
        return f"causal={self.causal}, window={self.window}, softcap={self.softcap}, dropout_p={self.dropout_p}"
