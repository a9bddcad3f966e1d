"""A small GPT: a decoder-only transformer for the deepscale examples and benchmarks.

The architecture follows GPT-2 (Radford et al., 2019): learned positional embeddings,
pre-LayerNorm blocks, causal multi-head self-attention, a GELU MLP of width 4 * d_model and
a language-model head whose weight is tied to the token embedding (Press & Wolf, 2017).

``GPT.forward`` returns the mean next-token cross-entropy, so a training engine can run
``loss = engine(batch)`` on it directly.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepscale.ops.attention import attention

IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    """Sizes of the model.

    Args:
        n_layer: number of transformer blocks. Default 6.
        n_head: attention heads per block; must divide ``d_model``. Default 8.
        d_model: hidden width. Default 512.
        vocab_size: number of token ids. Default 8192.
        seq_len: longest sequence (size of the positional table). Default 256.
        dropout: dropout probability on embeddings, attention and residual paths. Default 0.0.
    """
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    vocab_size: int = 8192
    seq_len: int = 256
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("n_layer", "n_head", "d_model", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by "
                             f"GPTConfig.n_head ({self.n_head})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # Sizes come from the projection's output, not from n_head, so the block also runs with
        # its heads split over tensor-parallel ranks (deepscale.parallel.apply_autotp).
        q, k, v = self.qkv(x).chunk(3, dim=2)
        # (batch, seq, heads * head_dim) -> (batch, seq, heads, head_dim): the layout of deepscale's
        # fused attention (compiled CPU/CUDA kernels, PyTorch fallback with a logged reason).
        q, k, v = (t.view(batch, seq, -1, self.head_dim) for t in (q, k, v))
        y = attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.reshape(batch, seq, -1)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward block: Linear(4x) -> GELU -> Linear."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def split_batch(batch):
    """Return ``(input_ids, labels)`` from a dict with those keys or a 2-sequence."""
    if isinstance(batch, dict):
        missing = [key for key in ("input_ids", "labels") if key not in batch]
        if missing:
            raise ValueError(f"GPT batch dict is missing keys {missing}; "
                             "expected 'input_ids' and 'labels'")
        return batch["input_ids"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError("GPT batch must be a dict with 'input_ids' and 'labels' or a "
                    f"(input_ids, labels) pair, got {type(batch).__name__}")


class GPT(nn.Module):
    """Decoder-only transformer language model returning the training loss.

    Args:
        cfg: a :class:`GPTConfig`.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one Parameter, counted once
        self.apply(self._init_weights)
        # GPT-2 scales the projections that feed the residual stream by 1/sqrt(2 * n_layer)
        # so the residual variance does not grow with depth.
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=resid_std)
            nn.init.normal_(block.mlp.proj.weight, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits of shape (batch, seq, vocab) for int64 ``input_ids`` (batch, seq)."""
        seq = input_ids.shape[1]
        if seq > self.cfg.seq_len:
            raise ValueError(f"sequence length {seq} exceeds GPTConfig.seq_len={self.cfg.seq_len}")
        pos = torch.arange(seq, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def forward(self, batch) -> torch.Tensor:
        """Mean cross-entropy of ``labels`` given ``input_ids``.

        Args:
            batch: dict with ``input_ids`` and ``labels`` (both (batch, seq) int64; label
                ``-100`` is ignored) or an ``(input_ids, labels)`` pair.
        """
        input_ids, labels = split_batch(batch)
        logits = self.logits(input_ids)
        # The softmax is taken in fp32 even when the model runs in bf16: a bf16 log-sum-exp
        # over thousands of classes loses about two decimal digits of the loss.
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
