"""The exact PyTorch attention every backend is checked against, and the fallback of last resort.

Plain autograd ops, one sequence at a time, with the score matrix materialised in float32
(float64 for float64 inputs); the result is cast back to the input dtype. It covers every
feature of :func:`deepscale.ops.attention.attention`: GQA/MQA, causal and window masks, softcap,
packed variable-length batches and dropout. Memory is O(seqlen_q x seqlen_k) per sequence and
head, so it is the fallback, not the fast path.
"""
import torch
import torch.nn.functional as F

from deepscale.ops.attention.spec import visible_mask


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_scores(qs, ks, spec):
    """Masked, capped scores ``[heads, sq, sk]`` of one sequence and its visibility mask ``[sq, sk]``.

    ``qs`` is ``[sq, heads, d]``, ``ks`` is ``[sk, kv_heads, d]``, both in the compute dtype.
    """
    sq, sk = qs.shape[0], ks.shape[0]
    kh = ks.repeat_interleave(spec.group, dim=1) if spec.group > 1 else ks
    scores = torch.einsum("qhd,khd->hqk", qs, kh) * spec.scale
    if spec.softcap:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    mask = visible_mask(sq, sk, spec.left, spec.right, device=qs.device)
    return scores, mask


def _sequence_attention(qs, ks, vs, spec, generator):
    scores, mask = sequence_scores(qs, ks, spec)
    row_any = mask.any(dim=-1, keepdim=True)  # [sq, 1]
    # Rows that see no key get zero scores before the softmax and zero weights after it,
    # so they output zeros with finite gradients instead of NaN.
    masked = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    masked = torch.where(row_any, masked, torch.zeros_like(scores))
    lse = torch.logsumexp(masked, dim=-1)
    lse = torch.where(row_any.squeeze(-1), lse, torch.full_like(lse, float("-inf")))
    probs = torch.softmax(masked, dim=-1) * row_any
    if spec.dropout_p > 0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= spec.dropout_p
        probs = probs * keep / (1.0 - spec.dropout_p)
    vh = vs.repeat_interleave(spec.group, dim=1) if spec.group > 1 else vs
    out = torch.einsum("hqk,khd->qhd", probs, vh)
    return out, lse


def reference_attention(q, k, v, spec, return_lse=False, generator=None):
    """Attention by plain PyTorch ops (differentiable), laid out as the inputs.

    Args:
        q, k, v: ``[batch, seq, heads, dim]`` or, when ``spec.varlen``, ``[total, heads, dim]``.
        spec: the checked problem (:func:`deepscale.ops.attention.spec.build_spec`).
        return_lse: also return the log-sum-exp of each query row, ``[heads, total_q]`` float32
            (float64 for float64 inputs). Default False.
        generator: torch.Generator for the dropout mask. Default None (the global one).
    """
    dtype = _compute_dtype(q.dtype)
    qp, kp, vp = (t.reshape(-1, t.shape[-2], t.shape[-1]).to(dtype) for t in (q, k, v))
    outs, lses = [], []
    for b in range(spec.batch):
        q0, q1, k0, k1 = spec.cu_q[b], spec.cu_q[b + 1], spec.cu_k[b], spec.cu_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no keys at all: zeros, like a row that sees nothing
            outs.append(qp.new_zeros(q1 - q0, spec.num_heads, spec.head_dim_v) + 0 * qp[q0:q1, :, :1])
            lses.append(qp.new_full((spec.num_heads, q1 - q0), float("-inf")))
            continue
        out, lse = _sequence_attention(qp[q0:q1], kp[k0:k1], vp[k0:k1], spec, generator)
        outs.append(out)
        lses.append(lse)
    if outs:
        out = torch.cat(outs, dim=0)
    else:
        out = qp.new_zeros(0, spec.num_heads, spec.head_dim_v)
    out = out.to(q.dtype).reshape(*q.shape[:-1], spec.head_dim_v)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else qp.new_zeros(spec.num_heads, 0)
    return out, lse
