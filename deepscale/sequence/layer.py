"""``deepspeed.sequence.layer`` under deepscale: re-exports of :mod:`deepscale.parallel.ulysses`."""
from deepscale.parallel.ulysses import (DistributedAttention, seq_all_to_all, sequence_parallel_loss)

__all__ = ["DistributedAttention", "seq_all_to_all", "sequence_parallel_loss"]
