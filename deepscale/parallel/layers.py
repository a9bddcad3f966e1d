"""Tensor-parallel layers: column- and row-parallel linears and a vocabulary-parallel embedding.

A column-parallel linear keeps a slice of the output features (rows of the weight) on each
rank; a row-parallel linear keeps a slice of the input features (columns). A column layer
followed by a row layer needs one all-reduce forward and one backward (Megatron-LM, Shoeybi et
al. 2019). Slices may be unequal (``output_sizes`` / ``input_sizes``), which AutoTP uses for
head counts the tensor-parallel size does not divide.

Every sharded parameter carries ``tensor_model_parallel = True`` and ``partition_dim`` (Megatron's
names), and the layer remembers which global rows or columns it holds (``shard_index``), so the
whole weight can be rebuilt for a checkpoint at another tensor-parallel degree
(``deepscale.parallel.state_dict``).
"""
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepscale.parallel.mappings import (allreduce_grad_over, copy_to_region, even_sizes, gather_along_dim,
                                         gather_sequence, group_rank, group_size, reduce_from_region,
                                         reduce_scatter_sequence, split_along_dim)


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim


def _default_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default


def _local_index(sizes: Sequence[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return torch.arange(start, start + sizes[rank])


def _resolve_sizes(total: int, sizes: Optional[Sequence[int]], world: int, what: str):
    if sizes is None:
        if total % world:
            raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {world}; pass "
                             f"explicit per-rank sizes (e.g. {even_sizes(total, world)}) for unequal shards")
        return [total // world] * world, False
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or sum(sizes) != total or min(sizes) < 0:
        raise ValueError(f"{what} sizes {sizes} must have one non-negative entry per tensor-parallel rank ({world}) "
                         f"and sum to {total}")
    return sizes, len(set(sizes)) > 1


class _ShardedLinear(nn.Module):
    """Shared construction of the two linear layers (weight layout ``(out, in)`` like ``nn.Linear``)."""

    def _build(self, local_out, local_in, full_weight_shape, dim, bias_features, bias_sharded, init_method,
               device, dtype):
        init_method = init_method or _default_init
        # Every rank initialises the whole weight from the same generator state and keeps its slice,
        # so a model built at TP=N starts from the same weights as at TP=1.
        full = torch.empty(full_weight_shape, device=device, dtype=torch.float32)
        init_method(full)
        self.weight = nn.Parameter(full.index_select(dim, self.shard_index.to(full.device)).to(dtype))
        _mark_sharded(self.weight, dim)
        if bias_features:
            fan_in = full_weight_shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            full_bias = torch.empty(bias_features, device=device, dtype=torch.float32).uniform_(-bound, bound)
            if bias_sharded:
                full_bias = full_bias.index_select(0, self.shard_index.to(full_bias.device))
                self.bias = nn.Parameter(full_bias.to(dtype))
                _mark_sharded(self.bias, 0)
            else:
                self.bias = nn.Parameter(full_bias.to(dtype))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}, "
                f"local_shape={tuple(self.weight.shape)}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


class ColumnParallelLinear(_ShardedLinear):
    """``y = x W^T + b`` with the output features split over the tensor-parallel group.

    Args:
        in_features, out_features: the whole layer's sizes.
        bias: add a bias (sharded like the outputs). Default True.
        gather_output: all-gather the output slices so every rank returns the whole ``y``.
            Default False (the next layer is usually a :class:`RowParallelLinear`).
        tp_group: the tensor-parallel process group (None: the default group).
        sequence_parallel: the input is split along ``sequence_dim``; it is all-gathered here
            (and the gradient reduce-scattered). Default False.
        sequence_dim: the sequence dimension of the input. Default 1 (``(batch, seq, hidden)``).
        output_sizes: output features per rank when they are not equal. Default equal.
        init_method: initialiser applied to the whole weight before slicing. Default ``nn.Linear``'s.
        skip_bias_add: return ``(y, bias)`` without adding the bias (for fusing it later). Default False.
        device, dtype: of the parameters. Default CPU / float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 tp_group=None, sequence_parallel: bool = False, sequence_dim: int = 1,
                 output_sizes: Optional[Sequence[int]] = None, init_method: Optional[Callable] = None,
                 skip_bias_add: bool = False, device=None, dtype=None):
        super().__init__()
        self._setup(in_features, out_features, gather_output, tp_group, sequence_parallel, sequence_dim,
                    output_sizes, skip_bias_add)
        local_out = self.output_sizes[self.tp_rank]
        self._build(local_out, in_features, (out_features, in_features), 0, out_features if bias else 0, True,
                    init_method, device, dtype or torch.float32)

    def _setup(self, in_features, out_features, gather_output, tp_group, sequence_parallel, sequence_dim,
               output_sizes, skip_bias_add, shard_index=None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.gather_output, self.sequence_parallel = bool(gather_output), bool(sequence_parallel)
        self.sequence_dim, self.skip_bias_add = sequence_dim, bool(skip_bias_add)
        self.output_sizes, self.uneven = _resolve_sizes(self.out_features, output_sizes, self.tp_size,
                                                        "ColumnParallelLinear out_features")
        self.shard_index = _local_index(self.output_sizes, self.tp_rank) if shard_index is None else shard_index

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor,
                   output_sizes: Sequence[int], tp_group=None, gather_output: bool = False,
                   sequence_parallel: bool = False, sequence_dim: int = 1) -> "ColumnParallelLinear":
        """Shard an existing ``(out, in)`` weight: this rank keeps the output ``rows`` (a LongTensor).

        ``output_sizes`` lists every rank's row count (needed to gather the output). The new
        parameters are copies; the dense tensors can be freed afterwards.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight.shape[1], weight.shape[0], gather_output, tp_group, sequence_parallel, sequence_dim,
                    output_sizes, False, shard_index=rows.to(torch.long).cpu())
        if self.shard_index.numel() != self.output_sizes[self.tp_rank]:
            raise ValueError(f"ColumnParallelLinear.from_dense: {self.shard_index.numel()} rows for rank "
                             f"{self.tp_rank}, but output_sizes says {self.output_sizes[self.tp_rank]}")
        index = self.shard_index.to(weight.device)
        self.weight = nn.Parameter(weight.detach().index_select(0, index).clone(),
                                   requires_grad=weight.requires_grad)
        _mark_sharded(self.weight, 0)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().index_select(0, index).clone(), requires_grad=bias.requires_grad)
            _mark_sharded(self.bias, 0)
        else:
            self.register_parameter("bias", None)
        return self

    def forward(self, x: torch.Tensor):
        if self.sequence_parallel:
            x = gather_sequence(x, self.tp_group, self.sequence_dim)
        else:
            x = copy_to_region(x, self.tp_group)
        bias = None if self.skip_bias_add else self.bias
        y = F.linear(x, self.weight, bias)
        if self.gather_output:
            y = gather_along_dim(y, self.tp_group, -1, self.output_sizes if self.uneven else None)
        return (y, self.bias) if self.skip_bias_add else y


class RowParallelLinear(_ShardedLinear):
    """``y = x W^T + b`` with the input features split over the tensor-parallel group.

    The partial products are summed with an all-reduce, or with a reduce-scatter along the
    sequence under sequence parallelism. The bias is whole on every rank and added after the sum.

    Args:
        in_features, out_features: the whole layer's sizes.
        bias: add a bias. Default True.
        input_is_parallel: the input is already this rank's slice of the features (the output
            of a :class:`ColumnParallelLinear`). False: split it here. Default True.
        tp_group: the tensor-parallel process group (None: the default group).
        sequence_parallel: reduce-scatter the output along ``sequence_dim`` instead of
            all-reducing it. Default False.
        sequence_dim: the sequence dimension of the output. Default 1.
        input_sizes: input features per rank when they are not equal. Default equal.
        init_method, skip_bias_add, device, dtype: as for :class:`ColumnParallelLinear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 tp_group=None, sequence_parallel: bool = False, sequence_dim: int = 1,
                 input_sizes: Optional[Sequence[int]] = None, init_method: Optional[Callable] = None,
                 skip_bias_add: bool = False, device=None, dtype=None):
        super().__init__()
        self._setup(in_features, out_features, input_is_parallel, tp_group, sequence_parallel, sequence_dim,
                    input_sizes, skip_bias_add)
        self._build(self.input_sizes[self.tp_rank], in_features, (out_features, in_features), 1,
                    out_features if bias else 0, False, init_method, device, dtype or torch.float32)
        self._mark_bias()

    def _setup(self, in_features, out_features, input_is_parallel, tp_group, sequence_parallel, sequence_dim,
               input_sizes, skip_bias_add, shard_index=None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.input_is_parallel, self.sequence_parallel = bool(input_is_parallel), bool(sequence_parallel)
        self.sequence_dim, self.skip_bias_add = sequence_dim, bool(skip_bias_add)
        self.input_sizes, self.uneven = _resolve_sizes(self.in_features, input_sizes, self.tp_size,
                                                       "RowParallelLinear in_features")
        self.shard_index = _local_index(self.input_sizes, self.tp_rank) if shard_index is None else shard_index

    def _mark_bias(self) -> None:
        # Under sequence parallelism each rank adds the bias to its own tokens only, so its
        # gradient is a partial sum over the group.
        if self.bias is not None and self.sequence_parallel:
            allreduce_grad_over(self.bias, self.tp_group)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], cols: torch.Tensor,
                   input_sizes: Sequence[int], tp_group=None, sequence_parallel: bool = False,
                   sequence_dim: int = 1) -> "RowParallelLinear":
        """Shard an existing ``(out, in)`` weight: this rank keeps the input ``cols`` (a LongTensor)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight.shape[1], weight.shape[0], True, tp_group, sequence_parallel, sequence_dim,
                    input_sizes, False, shard_index=cols.to(torch.long).cpu())
        index = self.shard_index.to(weight.device)
        self.weight = nn.Parameter(weight.detach().index_select(1, index).clone(),
                                   requires_grad=weight.requires_grad)
        _mark_sharded(self.weight, 1)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self._mark_bias()
        return self

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel:
            x = split_along_dim(x, self.tp_group, -1, self.input_sizes if self.uneven else None)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_sequence(y, self.tp_group, self.sequence_dim)
        else:
            y = reduce_from_region(y, self.tp_group)
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """An embedding table whose rows (the vocabulary) are split over the tensor-parallel group.

    Each rank looks up the ids in its range and writes zeros for the others; the sum over the
    group (an all-reduce, or a reduce-scatter along the sequence under sequence parallelism)
    gives every rank the embeddings.

    Args:
        num_embeddings, embedding_dim: the whole table's sizes.
        padding_idx: as in ``nn.Embedding`` (its row gets no gradient). Default None.
        tp_group: the tensor-parallel process group (None: the default group).
        sequence_parallel: return this rank's slice of the sequence. Default False.
        sequence_dim: the sequence dimension of the output. Default 1.
        vocab_sizes: rows per rank; default as even as possible (the first ranks one row more).
        init_method: initialiser of the whole table before slicing. Default ``normal_(0, 1)``.
        device, dtype: of the table. Default CPU / float32.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None, tp_group=None,
                 sequence_parallel: bool = False, sequence_dim: int = 1,
                 vocab_sizes: Optional[Sequence[int]] = None, init_method: Optional[Callable] = None,
                 device=None, dtype=None):
        super().__init__()
        self._setup(num_embeddings, embedding_dim, padding_idx, tp_group, sequence_parallel, sequence_dim,
                    vocab_sizes)
        full = torch.empty(num_embeddings, embedding_dim, device=device, dtype=torch.float32)
        (init_method or nn.init.normal_)(full)
        if padding_idx is not None:
            full[padding_idx].zero_()
        self.weight = nn.Parameter(full[self.vocab_start:self.vocab_end].to(dtype or torch.float32))
        _mark_sharded(self.weight, 0)

    def _setup(self, num_embeddings, embedding_dim, padding_idx, tp_group, sequence_parallel, sequence_dim,
               vocab_sizes):
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.sequence_parallel, self.sequence_dim = bool(sequence_parallel), sequence_dim
        if vocab_sizes is None:
            vocab_sizes = even_sizes(self.num_embeddings, self.tp_size)
        self.vocab_sizes, _ = _resolve_sizes(self.num_embeddings, vocab_sizes, self.tp_size,
                                             "VocabParallelEmbedding num_embeddings")
        self.vocab_start = sum(self.vocab_sizes[:self.tp_rank])
        self.vocab_end = self.vocab_start + self.vocab_sizes[self.tp_rank]
        self.shard_index = torch.arange(self.vocab_start, self.vocab_end)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, tp_group=None, sequence_parallel: bool = False,
                   sequence_dim: int = 1, vocab_sizes: Optional[Sequence[int]] = None) -> "VocabParallelEmbedding":
        """Shard an existing ``nn.Embedding`` (a copy of this rank's rows)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, tp_group,
                    sequence_parallel, sequence_dim, vocab_sizes)
        self.weight = nn.Parameter(embedding.weight.detach()[self.vocab_start:self.vocab_end].clone(),
                                   requires_grad=embedding.weight.requires_grad)
        _mark_sharded(self.weight, 0)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        pad = self.padding_idx
        local_pad = pad - self.vocab_start if pad is not None and self.vocab_start <= pad < self.vocab_end else None
        out = F.embedding(local, self.weight, local_pad)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(out, self.tp_group, self.sequence_dim)
        return reduce_from_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.tp_size}, "
                f"rows=[{self.vocab_start}, {self.vocab_end})")


def tie_column_to_embedding(embedding: VocabParallelEmbedding, bias: Optional[torch.Tensor] = None,
                            gather_output: bool = True, sequence_parallel: bool = False,
                            sequence_dim: int = 1) -> ColumnParallelLinear:
    """A vocabulary-parallel output layer that shares ``embedding``'s weight (tied embeddings).

    The logits' vocabulary slices match the embedding's rows, so
    :func:`~deepscale.parallel.cross_entropy.vocab_parallel_cross_entropy` can consume them with
    ``gather_output=False``.
    """
    head = ColumnParallelLinear.__new__(ColumnParallelLinear)
    nn.Module.__init__(head)
    head._setup(embedding.embedding_dim, embedding.num_embeddings, gather_output, embedding.tp_group,
                sequence_parallel, sequence_dim, embedding.vocab_sizes, False, shard_index=embedding.shard_index)
    head.weight = embedding.weight
    if bias is not None:
        head.bias = nn.Parameter(bias.detach()[embedding.vocab_start:embedding.vocab_end].clone())
        _mark_sharded(head.bias, 0)
    else:
        head.register_parameter("bias", None)
    return head
