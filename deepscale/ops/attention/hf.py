"""deepscale attention as a Hugging Face ``transformers`` attention implementation.

``register_hf_attention()`` registers ``attn_implementation="deepscale"``: calls without a
mask tensor (causal or bidirectional, with or without a KV cache, GQA, softcap, sliding
window) run :func:`deepscale.ops.attention.attention`; calls that carry a mask tensor (padding,
custom patterns) or a position bias run transformers' own SDPA path, with the reason logged
once. Masks are built by transformers' SDPA mask function, which returns no tensor when the
pattern is plain causal, so unpadded batches take the fused path.
"""
from deepscale.ops.attention.api import attention
from deepscale.utils.logging import warning_once

HF_NAME = "deepscale"


def hf_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """The ``AttentionInterface`` function: query/key/value ``[batch, heads, seq, dim]``; returns
    ``(output [batch, seq, heads, dim], None)``."""
    if attention_mask is not None or kwargs.get("position_bias") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        warning_once("attention runs on transformers' sdpa: the call carries a mask tensor (padding or a custom "
                     "pattern), which deepscale's fused attention does not take")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sliding = kwargs.get("sliding_window")
    # transformers' sliding window W lets a query see itself and the W - 1 keys before it.
    window = (int(sliding) - 1, 0 if causal else int(sliding) - 1) if sliding else None
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=bool(causal),
                    softmax_scale=scaling, window=window, softcap=kwargs.get("softcap"),
                    dropout_p=dropout if module.training else 0.0)
    return out, None


def register_hf_attention(name=HF_NAME):
    """Register :func:`hf_attention_forward` (and the SDPA mask builder) under ``name`` with transformers.

    Then ``AutoModel.from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` uses it. Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(name, hf_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
