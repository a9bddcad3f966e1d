"""Fused attention: one entry point for CPU and CUDA, training and inference.

``attention(q, k, v, causal=False, softmax_scale=None, window=None, softcap=None,
cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0)``
with FlashAttention's ``[batch, seq, heads, head_dim]`` layout (or packed varlen batches),
GQA/MQA, causal and sliding-window masks, softcap and dropout. ``FusedAttention`` is the module
form; ``explain`` says which backend a call would use and why; ``register_hf_attention``
makes it a transformers ``attn_implementation``.
"""
from deepscale.ops.attention.api import FusedAttention, attention, explain
from deepscale.ops.attention.hf import hf_attention_forward, register_hf_attention
from deepscale.ops.attention.reference import reference_attention
from deepscale.ops.attention.spec import AttentionSpec, build_spec

__all__ = ["attention", "FusedAttention", "explain", "reference_attention", "build_spec", "AttentionSpec",
           "register_hf_attention", "hf_attention_forward"]
