"""Argument checking for :func:`deepscale.ops.attention.attention`.

Turns the user's tensors and options into one :class:`AttentionSpec` whose metadata is plain
Python ints (sequence offsets, lengths, head counts, window bounds), so a backend never reads
a device tensor to learn the problem shape and nothing is recompiled per batch.

Note: the mask convention (the one FlashAttention uses).
  Query row ``i`` of a sequence with ``seqlen_q`` queries and ``seqlen_k`` keys sits at key
  position ``i + seqlen_k - seqlen_q`` (queries are the *last* rows: bottom-right alignment).
  Key ``j`` is visible when ``-left <= j - (i + seqlen_k - seqlen_q) <= right``. ``causal``
  sets ``right = 0``; ``window=w`` sets ``left = w`` (and ``right = w`` unless causal); a pair
  ``window=(left, right)`` sets both, ``-1`` meaning unbounded on that side. A query row that
  sees no key (possible when ``seqlen_q > seqlen_k`` under causal) outputs zeros and has a
  log-sum-exp of ``-inf``; its gradients are zero.
"""
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
UNBOUNDED = -1


@dataclass(frozen=True)
class AttentionSpec:
    """A checked attention problem, in the packed (varlen) form every backend takes.

    Attributes:
        varlen: True when the caller passed packed ``[total, heads, dim]`` tensors.
        batch: number of sequences.
        cu_q, cu_k: start offsets of each sequence in the packed token axis (``batch + 1`` ints).
        max_q, max_k: longest query and key sequence.
        num_heads, num_kv_heads, head_dim, head_dim_v: head counts and sizes.
        scale: the softmax scale (``head_dim ** -0.5`` unless given).
        left, right: window bounds after causal is folded in; -1 is unbounded.
        causal: whether the caller asked for a causal mask (already folded into ``right``).
        softcap: ``softcap * tanh(score / softcap)`` applied before the mask, or 0.0 for none.
        dropout_p: probability of dropping an attention weight (training only).
    """

    varlen: bool
    batch: int
    cu_q: tuple
    cu_k: tuple
    max_q: int
    max_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    scale: float
    left: int
    right: int
    causal: bool
    softcap: float
    dropout_p: float

    @property
    def group(self):
        """Query heads per key/value head (1 for MHA, ``num_heads`` for MQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def masked(self):
        """True when some key is hidden from some query (causal or a finite window)."""
        return self.left != UNBOUNDED or self.right != UNBOUNDED

    def seqlens(self):
        """``[(seqlen_q, seqlen_k), ...]`` per sequence."""
        return [(self.cu_q[b + 1] - self.cu_q[b], self.cu_k[b + 1] - self.cu_k[b]) for b in range(self.batch)]


def _normalise_window(window, causal):
    if window is None:
        left, right = UNBOUNDED, UNBOUNDED
    elif isinstance(window, bool) or not isinstance(window, (int, tuple, list)):
        raise TypeError(f"window must be None, an int or a (left, right) pair of ints, got {window!r}")
    elif isinstance(window, int):
        if window < 0:
            raise ValueError(f"window must be >= 0 (the number of keys seen on each side), got {window}")
        left, right = window, window
    else:
        if len(window) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in window):
            raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
        left, right = window
        if left < UNBOUNDED or right < UNBOUNDED:
            raise ValueError(f"window bounds must be >= 0, or -1 for unbounded, got {tuple(window)!r}")
    if causal:
        right = 0
    return int(left), int(right)


def _as_offsets(cu_seqlens, name, total):
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32 or int64 tensor, got {cu_seqlens.dtype} with shape "
                            f"{tuple(cu_seqlens.shape)}")
        offsets = [int(x) for x in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (list, tuple)):
        offsets = [int(x) for x in cu_seqlens]
    else:
        raise TypeError(f"{name} must be a tensor or a list of ints, got {type(cu_seqlens).__name__}")
    if len(offsets) < 2 or offsets[0] != 0:
        raise ValueError(f"{name} must start at 0 and hold batch + 1 offsets, got {offsets[:8]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {offsets[:8]}...")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] = {offsets[-1]} must equal the packed token count {total}")
    return tuple(offsets)


def _check_tensors(q, k, v, varlen):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        want = 3 if varlen else 4
        if t.dim() != want:
            layout = "[total_tokens, heads, head_dim] (with cu_seqlens)" if varlen else "[batch, seq, heads, head_dim]"
            raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: float32, bfloat16, float16, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on all but the head dim, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"the number of query heads ({q.shape[-2]}) must be a multiple of the number of key/value "
                         f"heads ({k.shape[-2]}) (GQA/MQA)")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")


def build_spec(q, k, v, causal=False, softmax_scale=None, window=None, softcap=None, cu_seqlens_q=None,
               cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0):
    """Check the arguments of ``attention`` and return an :class:`AttentionSpec` (see there)."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("varlen attention needs both cu_seqlens_q and cu_seqlens_k")
    _check_tensors(q, k, v, varlen)
    if varlen:
        cu_q = _as_offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
        cu_k = _as_offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
        if len(cu_q) != len(cu_k):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got "
                             f"{len(cu_q) - 1} and {len(cu_k) - 1}")
        batch = len(cu_q) - 1
        longest_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
        longest_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
        for name, given, real in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
            if given is not None and int(given) < real:
                raise ValueError(f"{name}={given} is smaller than the longest sequence ({real})")
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = tuple(b * sq for b in range(batch + 1))
        cu_k = tuple(b * sk for b in range(batch + 1))
        longest_q, longest_k = sq, sk
    head_dim = q.shape[-1]
    if softmax_scale is None:
        scale = head_dim ** -0.5
    elif isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool) and softmax_scale > 0:
        scale = float(softmax_scale)
    else:
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    if softcap is None or softcap == 0:
        softcap = 0.0
    elif not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or softcap < 0:
        raise ValueError(f"softcap must be a positive number, 0 or None, got {softcap!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    left, right = _normalise_window(window, bool(causal))
    return AttentionSpec(varlen=varlen, batch=batch, cu_q=cu_q, cu_k=cu_k, max_q=longest_q, max_k=longest_k,
                         num_heads=q.shape[-2], num_kv_heads=k.shape[-2], head_dim=head_dim, head_dim_v=v.shape[-1],
                         scale=scale, left=left, right=right, causal=bool(causal), softcap=float(softcap),
                         dropout_p=float(dropout_p))


def visible_mask(seqlen_q, seqlen_k, left, right, device=None):
    """Boolean ``[seqlen_q, seqlen_k]`` mask of the keys each query sees (see the module note)."""
    rows = torch.arange(seqlen_q, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device).unsqueeze(0)
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right != UNBOUNDED:
        mask &= cols - rows <= right
    if left != UNBOUNDED:
        mask &= rows - cols <= left
    return mask
