"""A small GPT with tied embeddings and its analytic FLOP count, shared by the flops profiler tests
and benchmarks/bench_flops_profiler.py (which also runs it under DeepSpeed's profiler)."""
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

CHECKPOINT_MODES = ("none", "reentrant", "non_reentrant")


class Attention(torch.nn.Module):
    def __init__(self, d_model: int, num_heads: int, impl: str):
        super().__init__()
        self.num_heads, self.impl = num_heads, impl
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # explicit matmuls: what torch.utils.flop_counter can count on CPU
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Block(torch.nn.Module):
    def __init__(self, d_model: int, num_heads: int, impl: str):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, impl)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    """Decoder-only LM; the output head reuses the token embedding (tied weights).

    ``checkpoint``: ``"none"``, ``"reentrant"`` or ``"non_reentrant"`` (torch.utils.checkpoint
    around each block); ``checkpoint_fn`` overrides it with any ``fn(block, x)``.
    """

    def __init__(self, vocab=512, d_model=128, num_layers=2, num_heads=4, seq=64, impl="manual",
                 checkpoint="none", checkpoint_fn=None):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d_model)
        self.wpe = torch.nn.Embedding(seq, d_model)
        self.blocks = torch.nn.ModuleList(Block(d_model, num_heads, impl) for _ in range(num_layers))
        self.ln_f = torch.nn.LayerNorm(d_model)
        self.checkpoint, self.checkpoint_fn = checkpoint, checkpoint_fn

    def _run_block(self, block, x):
        if self.checkpoint_fn is not None:
            return self.checkpoint_fn(block, x)
        if self.checkpoint == "none" or not torch.is_grad_enabled():
            return block(x)
        return torch_checkpoint.checkpoint(block, x, use_reentrant=self.checkpoint == "reentrant")

    def forward(self, ids, labels=None):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = self._run_block(block, x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def analytic_flops(vocab, d_model, num_layers, seq, batch, **_) -> dict:
    """Matrix-product FLOPs of one forward and of a training step (forward + backward).

    The weights of the matmuls: per layer qkv 3d^2, proj d^2, MLP 8d^2; the tied head V*d.
    Each weight costs 2 flops per token in forward and 4 in backward (6 x params x tokens);
    attention adds QK^T and AV, 2 x 2 x batch x seq^2 x d per layer forward (causal masking
    is not subtracted, as in torch.utils.flop_counter), x3 for a training step.
    ``train_fused_attention``: with a fused (flash) attention kernel, whose backward recomputes
    QK^T; torch.utils.flop_counter's formula counts that matmul too, so attention costs 3.5x
    its forward in a training step instead of 3x.
    """
    tokens = batch * seq
    matmul_params = num_layers * 12 * d_model ** 2 + vocab * d_model
    attention_fwd = num_layers * 4 * batch * seq ** 2 * d_model
    block_fwd = num_layers * (2 * 12 * d_model ** 2 * tokens) + attention_fwd
    forward = 2 * matmul_params * tokens + attention_fwd
    return {"forward": forward, "train": 6 * matmul_params * tokens + 3 * attention_fwd,
            "train_fused_attention": 6 * matmul_params * tokens + 3.5 * attention_fwd,
            "block_forward": block_fwd, "matmul_params": matmul_params}


def batch_of(vocab, seq, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return ids, torch.roll(ids, -1, dims=1)
