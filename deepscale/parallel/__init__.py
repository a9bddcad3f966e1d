"""Tensor and sequence parallelism: layers, AutoTP, the parallel grid, Ulysses attention, the RNG tracker.

``layers``: :class:`ColumnParallelLinear`, :class:`RowParallelLinear`, :class:`VocabParallelEmbedding`;
``cross_entropy``: :func:`vocab_parallel_cross_entropy`; ``mappings``: the autograd collectives
(including Megatron sequence parallelism); ``autotp``: :func:`apply_autotp`; ``grid``: the
process groups as a Megatron-style mpu; ``ulysses``: :class:`DistributedAttention`; ``random``:
the model-parallel RNG tracker.
"""
from deepscale.parallel.autotp import AutoTPReport, ReplicatedHeadsLinear, apply_autotp
from deepscale.parallel.cross_entropy import vocab_parallel_cross_entropy
from deepscale.parallel.grid import ParallelGrid, build_parallel_grid, get_parallel_grid, reset_parallel_grid
from deepscale.parallel.heads import HeadShard, plan_heads
from deepscale.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       tie_column_to_embedding)
from deepscale.parallel.mappings import (allreduce_grad_over, copy_to_region, even_sizes, gather_along_dim,
                                         gather_sequence, reduce_from_region, reduce_scatter_sequence,
                                         scatter_sequence, split_along_dim)
from deepscale.parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from deepscale.parallel.ulysses import DistributedAttention, seq_all_to_all, sequence_parallel_loss

__all__ = [name for name in dir() if not name.startswith("_")]
