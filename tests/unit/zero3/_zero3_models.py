"""A tiny GPT for the ZeRO-3 tests: tied embeddings, a module called twice, an external
parameter, an optional frozen layer, activation checkpointing and dict/tuple outputs."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VOCAB, SEQ, DIM, LAYERS = 32, 8, 16, 2


class Attention(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)  # a key bias gets no gradient
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return {"out": self.proj(att @ v), "note": "a non-tensor value"}


class Block(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, 4 * dim)
        self.out = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))["out"]
        return x + self.out(F.gelu(self.fc(self.ln2(x)))), None


class TinyGPT(torch.nn.Module):
    """Token + position embeddings (the position table is read by the root: an external
    parameter), blocks, a ``shared`` layer applied twice, and an LM head tied to the token
    embedding. Returns the mean cross-entropy."""

    def __init__(self, frozen: bool = False, register_external: bool = True, use_checkpoint: bool = False,
                 layers: int = LAYERS, dim: int = DIM):
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, dim)
        self.wpe = torch.nn.Embedding(SEQ, dim)
        self.blocks = torch.nn.ModuleList([Block(dim) for _ in range(layers)])
        self.shared = torch.nn.Linear(dim, dim)
        self.ln_f = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight
        self.use_checkpoint = use_checkpoint
        if frozen:
            for param in self.blocks[0].fc.parameters():
                param.requires_grad_(False)
        if register_external:
            import deepscale.zero
            deepscale.zero.register_external_parameter(self, self.wpe.weight)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe.weight[:idx.shape[1]]
        for block in self.blocks:
            if self.use_checkpoint:
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, _ = block(x)
        x = x + self.shared(torch.tanh(self.shared(x)))  # the same module twice
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))


def make_gpt(seed: int = 7, **kwargs) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(**kwargs)


def gpt_global_batch(step: int, batch_size: int):
    gen = torch.Generator().manual_seed(5000 + step)
    idx = torch.randint(0, VOCAB, (batch_size, SEQ), generator=gen)
    return idx, torch.roll(idx, -1, dims=1)


def gpt_rank_batch(step: int, micro: int, rank: int, micro_bs: int, gas: int, world: int):
    idx, tgt = gpt_global_batch(step, micro_bs * gas * world)
    start = (micro * world + rank) * micro_bs
    return idx[start:start + micro_bs], tgt[start:start + micro_bs]
