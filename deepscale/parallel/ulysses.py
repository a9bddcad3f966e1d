"""Ulysses sequence parallelism: attention over a sequence split across ranks.

Note: the all-to-all (Jacobs et al. 2023, "DeepSpeed Ulysses"). Each rank of the
sequence-parallel group holds a slice of the sequence for all heads. One all-to-all per input
turns that into the whole sequence for a slice of the heads; any local attention (SDPA, the
fused attention op, a Hugging Face attention function) runs on it unchanged, since heads are
independent; a second all-to-all turns the output back into sequence slices. Communication per
rank is ``O(sequence * hidden / sp)``, constant as sp and the sequence grow together.

What the degree does not divide is handled rather than refused:

* sequence slices of unequal length (a sequence the degree does not divide): the all-to-all
  carries each rank's own length, so the gathered sequence is exact and needs no padding or mask;
* a head count the degree does not divide: ranks take unequal numbers of heads;
* grouped-query key/value heads: split with their query heads when the degree divides both
  counts, replicated to one per rank when the degree is a multiple of them, and expanded to one
  per query head otherwise (exact, at the cost of memory).
"""
import math
from typing import List, Sequence, Tuple

import torch

from deepscale import comm as dist
from deepscale.parallel.mappings import even_sizes, group_rank, group_size


def _a2a(x: torch.Tensor, scatter_dim: int, gather_dim: int, scatter_sizes: Sequence[int],
         gather_sizes: Sequence[int], group) -> torch.Tensor:
    """Send slice ``j`` of ``x`` along ``scatter_dim`` to rank ``j``; concatenate what arrives along ``gather_dim``.

    ``scatter_sizes`` (the same on every rank) sizes the slices; ``gather_sizes[j]`` is rank
    ``j``'s length along ``gather_dim``.
    """
    world, rank = group_size(group), group_rank(group)
    moved = x.movedim(scatter_dim, 0).contiguous()
    rest = list(moved.shape[1:])
    g = gather_dim + 1 if gather_dim < scatter_dim else gather_dim  # gather_dim inside ``moved``
    rest_numel = math.prod(rest)
    in_splits = [s * rest_numel for s in scatter_sizes]
    recv_shapes = []
    for j in range(world):
        shape = [scatter_sizes[rank]] + rest
        shape[g] = gather_sizes[j]
        recv_shapes.append(shape)
    out_splits = [math.prod(s) for s in recv_shapes]
    out = moved.new_empty(sum(out_splits))
    dist.all_to_all_single(out, moved.view(-1), output_split_sizes=out_splits, input_split_sizes=in_splits,
                           group=group)
    pieces = [p.view(s) for p, s in zip(out.split(out_splits), recv_shapes)]
    return torch.cat(pieces, dim=g).movedim(0, scatter_dim)


class _SeqAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, group):
        ctx.args = (scatter_dim, gather_dim, scatter_sizes, gather_sizes, group)
        return _a2a(x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, scatter_sizes, gather_sizes, group = ctx.args
        # The adjoint swaps the roles: scatter what was gathered, gather what was scattered.
        return _a2a(grad.contiguous(), gather_dim, scatter_dim, gather_sizes, scatter_sizes, group), \
            None, None, None, None, None


def seq_all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int, scatter_sizes: Sequence[int],
                   gather_sizes: Sequence[int]) -> torch.Tensor:
    """Autograd-aware all-to-all over ``group`` (see :func:`_a2a`); the backward is the inverse all-to-all."""
    return _SeqAllToAll.apply(x, scatter_dim % x.dim(), gather_dim % x.dim(), tuple(scatter_sizes),
                              tuple(gather_sizes), group)


def sequence_lengths(local_len: int, group, device=None) -> List[int]:
    """Every rank's local sequence length (one small all-gather)."""
    world = group_size(group)
    if world == 1:
        return [local_len]
    mine = torch.tensor([local_len], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [int(p.item()) for p in parts]


def plan_kv_heads(num_q: int, num_kv: int, world: int) -> Tuple[str, List[int], List[int]]:
    """How to split query and key/value heads over ``world`` ranks.

    Returns ``(kv_mode, q_sizes, kv_sizes)`` with ``kv_mode`` one of ``"split"`` (key/value heads
    split alongside their queries), ``"replicate"`` (each repeated ``world // num_kv`` times
    first) or ``"expand"`` (each repeated ``num_q // num_kv`` times first).

    Raises:
        ValueError: fewer query heads than ranks, or query heads not a multiple of key/value heads.
    """
    if num_q < world:
        raise ValueError(f"Ulysses sequence parallelism: sequence_parallel_size {world} exceeds the {num_q} attention "
                         f"heads; every rank needs at least one head (use a degree of at most {num_q})")
    if num_q % num_kv:
        raise ValueError(f"Ulysses sequence parallelism: {num_q} query heads are not a multiple of {num_kv} key/value "
                         "heads")
    if num_q % world == 0 and num_kv % world == 0:
        return "split", even_sizes(num_q, world), even_sizes(num_kv, world)
    if num_q % world == 0 and world % num_kv == 0:
        return "replicate", even_sizes(num_q, world), [1] * world
    q_sizes = even_sizes(num_q, world)
    return ("split" if num_kv == num_q else "expand"), q_sizes, q_sizes


class DistributedAttention(torch.nn.Module):
    """Attention over a sequence split across the sequence-parallel group (DeepSpeed-Ulysses).

    Args:
        local_attention: callable ``(q, k, v, *args, **kwargs) -> out`` on whole sequences and a
            slice of the heads, in the same layout as the inputs.
        sequence_process_group: the sequence-parallel process group.
        scatter_idx: the heads dimension of ``q``/``k``/``v``. Default 2 (``(seq, batch, heads, dim)``).
        gather_idx: the sequence dimension. Default 0. Use ``scatter_idx=2, gather_idx=1`` for
            ``(batch, seq, heads, dim)``.
        sp_stream: accepted for DeepSpeed compatibility (overlap streams); unused.
        num_kv_heads: accepted for DeepSpeed compatibility; the key/value head count is read
            from ``key`` (and checked against this when given).

    ``forward(query, key, value, batch_dim_idx=None, rotary_pos_emb=None, *args, **kwargs)``
    takes this rank's sequence slice of each (lengths may differ between ranks; ``key``/``value``
    may have fewer heads) and returns this rank's slice of the attention output. As in
    DeepSpeed, ``batch_dim_idx`` (0 or 1) names the batch dimension of 4-D inputs, making the
    other of dimensions 0 and 1 the sequence; None keeps ``gather_idx``. ``args``/``kwargs`` go
    to ``local_attention``.
    """

    def __init__(self, local_attention, sequence_process_group, scatter_idx: int = 2, gather_idx: int = 0,
                 sp_stream=None, num_kv_heads=None):
        super().__init__()
        if scatter_idx == gather_idx:
            raise ValueError(f"DistributedAttention: scatter_idx ({scatter_idx}, the heads dimension) and gather_idx "
                             f"({gather_idx}, the sequence dimension) must differ")
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx, self.gather_idx = scatter_idx, gather_idx
        self.sp_stream = sp_stream
        self.num_kv_heads = num_kv_heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_dim_idx=None,
                rotary_pos_emb=None, *args, **kwargs):
        if rotary_pos_emb is not None:
            raise ValueError("DistributedAttention: rotary_pos_emb is not supported; apply the rotary embedding to "
                             "the query and key slices (with their global positions) before calling it")
        world = group_size(self.spg)
        if world == 1:
            return self.local_attn(query, key, value, *args, **kwargs)
        heads, seq = self.scatter_idx % query.dim(), self.gather_idx % query.dim()
        if batch_dim_idx is not None:
            if batch_dim_idx not in (0, 1):
                raise ValueError(f"DistributedAttention: batch_dim_idx must be 0 or 1, got {batch_dim_idx!r}")
            seq = 1 - batch_dim_idx
        if self.num_kv_heads is not None and key.shape[heads] != self.num_kv_heads:
            raise ValueError(f"DistributedAttention: num_kv_heads={self.num_kv_heads} but key has "
                             f"{key.shape[heads]} heads in dimension {heads}")
        if key.shape[heads] != value.shape[heads]:
            raise ValueError(f"DistributedAttention: key has {key.shape[heads]} heads but value has "
                             f"{value.shape[heads]} (dimension {heads})")
        mode, q_sizes, kv_sizes = plan_kv_heads(query.shape[heads], key.shape[heads], world)
        if mode != "split":
            repeat = world // key.shape[heads] if mode == "replicate" else query.shape[heads] // key.shape[heads]
            key, value = (t.repeat_interleave(repeat, dim=heads) for t in (key, value))
        seq_sizes = sequence_lengths(query.shape[seq], self.spg, query.device)
        q = seq_all_to_all(query, self.spg, heads, seq, q_sizes, seq_sizes)
        k = seq_all_to_all(key, self.spg, heads, seq, kv_sizes, seq_sizes)
        v = seq_all_to_all(value, self.spg, heads, seq, kv_sizes, seq_sizes)
        out = self.local_attn(q, k, v, *args, **kwargs)
        # Back: scatter the sequence, gather the heads.
        return seq_all_to_all(out, self.spg, seq, heads, seq_sizes, q_sizes)


def sequence_parallel_loss(local_loss_sum: torch.Tensor, local_num_tokens, group) -> torch.Tensor:
    """The loss to backpropagate on each sequence-parallel rank for a token-weighted mean.

    Returns ``local_loss_sum * sp / total_tokens`` (``total_tokens`` summed over ``group``): the
    engine averages gradients over the sequence-parallel ranks, so the average of these losses'
    gradients is the gradient of the mean over every token of the sequence, whatever the ranks'
    token counts (slices of unequal length, ignored labels). Averaging the returned values over
    the group gives the mean loss for logging.
    """
    world = group_size(group)
    count = torch.as_tensor(local_num_tokens, dtype=torch.float64, device=local_loss_sum.device).reshape(1).clone()
    if world > 1:
        dist.all_reduce(count, group=group)
    total = count.clamp(min=1).to(local_loss_sum.dtype)[0]
    return local_loss_sum * world / total
