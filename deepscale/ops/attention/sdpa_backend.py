"""torch's ``scaled_dot_product_attention`` as an attention backend (flash/cuDNN/efficient/CPU flash).

It takes padded ``[batch, seq, heads, dim]`` batches without softcap in which every query
row sees at least one key (SDPA returns NaN for a row that sees nothing, where deepscale's
convention is zeros); windows become a boolean mask, GQA uses ``enable_gqa``.
"""
import torch
import torch.nn.functional as F

from deepscale.ops.attention.spec import UNBOUNDED, visible_mask


def has_empty_rows(spec):
    """True when some query row of some sequence sees no key (see the mask note in spec.py)."""
    for sq, sk in spec.seqlens():
        if sq == 0:
            continue
        if sk == 0:
            return True
        off = sk - sq
        if spec.right != UNBOUNDED and off + spec.right < 0:  # the first row sits left of every key
            return True
        if spec.left != UNBOUNDED and (sq - 1 + off) - spec.left > sk - 1:  # the last row right of every key
            return True
    return False


def unsupported_reason(q, spec):
    """Why SDPA cannot run this call exactly (empty string when it can)."""
    if spec.varlen:
        return "torch SDPA takes padded batches, not packed varlen ones"
    if spec.softcap:
        return "torch SDPA has no softcap"
    if has_empty_rows(spec):
        return "some query rows see no key (SDPA would return NaN there)"
    if spec.head_dim_v != spec.head_dim and q.device.type == "cpu":
        return "torch SDPA on CPU needs equal q and v head dims"
    return ""


def sdpa_attention(q, k, v, spec):
    """Attention through ``F.scaled_dot_product_attention``; inputs and output ``[batch, seq, heads, dim]``."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sq, sk = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if spec.masked:
        if spec.left == UNBOUNDED and spec.right == 0 and sq == sk:
            is_causal = True
        else:
            mask = visible_mask(sq, sk, spec.left, spec.right, device=q.device)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=spec.dropout_p, is_causal=is_causal,
                                         scale=spec.scale, enable_gqa=spec.group > 1)
    return out.transpose(1, 2)
