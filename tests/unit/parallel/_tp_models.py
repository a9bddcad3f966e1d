"""Tiny random-weight models for the tensor/sequence-parallel tests (no downloads)."""
import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
VOCAB = 67  # odd on purpose: the vocabulary splits unevenly over 2 and 4 ranks

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=64)

# name -> (config class, keyword arguments). Dropout is 0 so TP=1 and TP=N see the same graph.
HF_ARCHS = {
    "llama_gqa": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2)),
    "llama_mqa": ("LlamaConfig", dict(_COMMON, num_key_value_heads=1)),
    "llama_uneven_heads": ("LlamaConfig", dict(_COMMON, hidden_size=48, num_attention_heads=6,
                                               num_key_value_heads=3, intermediate_size=50)),
    "mistral": ("MistralConfig", dict(_COMMON, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(_COMMON, num_key_value_heads=2, head_dim=8)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt_neox": ("GPTNeoXConfig", dict(_COMMON, hidden_dropout=0.0, attention_dropout=0.0,
                                       tie_word_embeddings=False)),
    "phi": ("PhiConfig", dict(_COMMON, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=48, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                              word_embed_proj_dim=32)),
}


def build_hf(name: str, seed: int = 0):
    """A causal LM of architecture ``name`` with weights from ``seed``."""
    import transformers
    cls_name, kwargs = HF_ARCHS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().train()


def load_example_gpt():
    spec = importlib.util.spec_from_file_location("tp_example_gpt_model", REPO / "examples" / "gpt" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_example_gpt(seed: int = 0, n_head: int = 4, d_model: int = 32, vocab_size: int = VOCAB):
    gpt = load_example_gpt()
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=n_head, d_model=d_model, vocab_size=vocab_size, seq_len=16))


def batches(num: int, batch: int, seq: int, seed: int = 5, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(num)]


class UlyssesGPT(torch.nn.Module):
    """The example GPT run with its sequence split over ``sp_group`` (Ulysses attention).

    ``forward((ids, labels, start))`` takes this rank's slice of the tokens and labels and the
    slice's first position; it returns :func:`sequence_parallel_loss` of the summed cross-entropy.
    """

    def __init__(self, gpt, sp_group):
        super().__init__()
        from deepscale.sequence.layer import DistributedAttention
        self.gpt, self.sp_group = gpt, sp_group

        def local(q, k, v):  # (batch, seq, heads, dim)
            return torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)

        self.attention = DistributedAttention(local, sp_group, scatter_idx=2, gather_idx=1)

    def _attn(self, block, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, block.head_dim) for t in block.qkv(x).chunk(3, dim=2))
        return block.proj(self.attention(q, k, v).reshape(b, s, -1))

    def forward(self, batch):
        from deepscale.sequence.layer import sequence_parallel_loss
        ids, labels, start = batch
        g = self.gpt
        pos = torch.arange(int(start), int(start) + ids.shape[1])
        x = g.tok_emb(ids) + g.pos_emb(pos)
        for block in g.blocks:
            x = x + self._attn(block.attn, block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        logits = g.lm_head(g.ln_f(x))
        loss_sum = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
        return sequence_parallel_loss(loss_sum, (labels != -100).sum(), self.sp_group)


class MegatronGPT(torch.nn.Module):
    """The example GPT rebuilt by hand from tensor-parallel layers (Megatron style), optionally with
    sequence parallelism, initialised from a dense example GPT ``dense``.

    The logits stay split over the vocabulary and the loss is :func:`vocab_parallel_cross_entropy`.
    """

    def __init__(self, dense, tp_group, sequence_parallel: bool):
        super().__init__()
        import copy
        from deepscale.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                        allreduce_grad_over, tie_column_to_embedding)
        from deepscale.parallel.heads import head_rows
        from deepscale.parallel.mappings import group_rank, group_size
        tp, rank = group_size(tp_group), group_rank(tp_group)
        self.group, self.sp = tp_group, sequence_parallel
        width, heads = dense.cfg.d_model, dense.cfg.n_head
        self.head_dim = width // heads
        local_heads = list(range(rank * heads // tp, (rank + 1) * heads // tp))
        q_rows = head_rows(local_heads, self.head_dim)
        q_sizes = [width // tp] * tp
        ffn = 4 * width
        ffn_rows = torch.arange(rank * ffn // tp, (rank + 1) * ffn // tp)
        self.emb = VocabParallelEmbedding.from_dense(dense.tok_emb, tp_group, sequence_parallel=sequence_parallel)
        self.pos = copy.deepcopy(dense.pos_emb)
        self.blocks = torch.nn.ModuleList()
        for block in dense.blocks:
            b = torch.nn.Module()
            b.ln_1, b.ln_2 = copy.deepcopy(block.ln_1), copy.deepcopy(block.ln_2)
            rows = torch.tensor(q_rows + [width + r for r in q_rows] + [2 * width + r for r in q_rows])
            b.qkv = ColumnParallelLinear.from_dense(block.attn.qkv.weight, block.attn.qkv.bias, rows,
                                                    [3 * s for s in q_sizes], tp_group,
                                                    sequence_parallel=sequence_parallel)
            b.proj = RowParallelLinear.from_dense(block.attn.proj.weight, block.attn.proj.bias, torch.tensor(q_rows),
                                                  q_sizes, tp_group, sequence_parallel=sequence_parallel)
            b.fc = ColumnParallelLinear.from_dense(block.mlp.fc.weight, block.mlp.fc.bias, ffn_rows,
                                                   [ffn // tp] * tp, tp_group, sequence_parallel=sequence_parallel)
            b.mproj = RowParallelLinear.from_dense(block.mlp.proj.weight, block.mlp.proj.bias, ffn_rows,
                                                   [ffn // tp] * tp, tp_group, sequence_parallel=sequence_parallel)
            self.blocks.append(b)
        self.ln_f = copy.deepcopy(dense.ln_f)
        self.head = tie_column_to_embedding(self.emb, gather_output=False, sequence_parallel=sequence_parallel)
        if sequence_parallel:
            # Replicated weights applied to this rank's slice of the tokens: sum their gradients. (Not
            # the positional table: it is applied before scatter_sequence, whose backward gathers.)
            for module in [self.ln_f] + [m for b in self.blocks for m in (b.ln_1, b.ln_2)]:
                for p in module.parameters():
                    allreduce_grad_over(p, tp_group)

    def forward(self, batch):
        from deepscale.parallel import scatter_sequence, vocab_parallel_cross_entropy
        ids, labels = batch
        pos = self.pos(torch.arange(ids.shape[1]))
        x = self.emb(ids) + (scatter_sequence(pos, self.group, dim=0) if self.sp else pos)
        for b in self.blocks:
            h = b.qkv(b.ln_1(x))  # whole sequence, this rank's heads
            bsz, seq, _ = h.shape
            q, k, v = (t.view(bsz, seq, -1, self.head_dim).transpose(1, 2) for t in h.chunk(3, dim=2))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.proj(y.transpose(1, 2).reshape(bsz, seq, -1))
            x = x + b.mproj(torch.nn.functional.gelu(b.fc(b.ln_2(x))))
        logits = self.head(self.ln_f(x))  # whole sequence, this rank's vocabulary slice
        return vocab_parallel_cross_entropy(logits, labels, self.group, self.emb.vocab_start, reduction="mean")
