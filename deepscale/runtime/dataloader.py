"""The training data loader the engine builds when given ``training_data``.

Note: exact resume. The loader's position is part of the engine checkpoint: the epoch, and how
many batches of that epoch were handed out. Shuffling is a pure function of ``seed + epoch``
(``DistributedSampler``), and the DataLoader draws its worker base seed from its own generator,
seeded from the seed, epoch and rank, instead of from the global torch RNG, so starting a pass never disturbs the
RNG a checkpoint restores (dropout would otherwise diverge after a resume). After
:meth:`DeepScaleDataLoader.load_state_dict`, the next ``iter()`` continues the saved epoch at
the next unseen batch by skipping sampler indices, without reading the skipped samples.
"""
from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from deepscale.utils.logging import logger

STATE_VERSION = 1


class _SkippingSampler(Sampler):
    """Yields the wrapped sampler's indices after dropping the first ``skip`` of them."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class DeepScaleDataLoader:
    """A DataLoader over this rank's shard of a dataset; each new pass reshuffles.

    Each ``iter()`` starts a new epoch of the ``DistributedSampler`` so the order differs
    between passes but is identical on every run with the same seed. The position inside the
    current pass is saved by :meth:`state_dict` and restored by :meth:`load_state_dict` (the
    engine's checkpoints do both), so a resumed run sees exactly the batches an uninterrupted
    one would.

    Args:
        dataset: a map-style ``Dataset`` (sharded by a DistributedSampler) or an
            ``IterableDataset`` (used as is; sharding is then the dataset's job, and resuming
            mid-pass re-reads and drops the batches already seen).
        batch_size: micro-batch size per rank.
        dp_rank, dp_world_size: this rank's data-parallel coordinates.
        collate_fn: passed to the DataLoader. Default: torch's default collation.
        drop_last: drop the incomplete last batch (``dataloader_drop_last``). Default False.
        shuffle: shuffle each epoch. Default True.
        seed: shuffling seed. Default 0.
        num_workers, pin_memory: passed to the DataLoader.
    """

    def __init__(self, dataset, batch_size: int, dp_rank: int = 0, dp_world_size: int = 1, collate_fn=None,
                 drop_last: bool = False, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                 pin_memory: bool = False):
        if not hasattr(dataset, "__iter__") and not hasattr(dataset, "__getitem__"):
            raise TypeError(f"training_data must be a torch Dataset (map-style or iterable), got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.dp_world_size = dp_world_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.epoch = -1
        self.batches_yielded = 0  # of the current epoch
        self._resume = None  # (epoch, batches already seen) that the next iter() continues
        self._generator = torch.Generator()
        if isinstance(dataset, IterableDataset):
            self.sampler = None
            sampler = None
        else:
            self.sampler = DistributedSampler(dataset, num_replicas=dp_world_size, rank=dp_rank,
                                              shuffle=shuffle, seed=seed, drop_last=drop_last)
            sampler = self._skipping = _SkippingSampler(self.sampler)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                                 drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                                 generator=self._generator)

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            (self.epoch, skip), self._resume = self._resume, None
        else:
            self.epoch += 1
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
            self._skipping.skip = skip * self.batch_size
        # Worker seeds come from this generator, never from the global RNG (see the module Note);
        # they differ between epochs and between ranks, so random augmentations do too.
        self._generator.manual_seed(hash((self.seed, self.epoch, self.dp_rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        return self._batches(skip)

    def _batches(self, skip: int):
        self.batches_yielded = skip
        iterator = iter(self.loader)
        if self.sampler is None:  # an iterable dataset cannot seek: drop what was already seen
            for _ in range(skip):
                next(iterator, None)
        for batch in iterator:
            self.batches_yielded += 1
            yield batch

    def __len__(self) -> int:
        if self.sampler is None:
            return len(self.loader)
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.loader.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` start ``epoch`` from its first batch."""
        self.epoch = epoch - 1
        self._resume = None

    def state_dict(self) -> dict:
        """The position to resume from: epoch, batches of it already yielded, and what they mean."""
        epoch, yielded = self._resume if self._resume is not None else (self.epoch, self.batches_yielded)
        return {"version": STATE_VERSION, "epoch": epoch, "batches_yielded": yielded,
                "batch_size": self.batch_size, "dp_world_size": self.dp_world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``: the next ``iter()`` continues its epoch at the first unseen batch.

        A position saved at another micro-batch size or data-parallel size is converted by the
        number of samples consumed globally; when that is not a whole number of batches here, the
        partly seen batch is skipped (with a warning).
        """
        epoch = int(state["epoch"])
        yielded = int(state.get("batches_yielded", 0))
        saved_per_batch = int(state.get("batch_size", self.batch_size)) * int(state.get("dp_world_size",
                                                                                        self.dp_world_size))
        per_batch = self.batch_size * self.dp_world_size
        consumed = yielded * saved_per_batch
        skip = -(-consumed // per_batch)
        if consumed % per_batch:
            logger.warning(f"data loader resume: {consumed} samples of epoch {epoch} were consumed, not a multiple of "
                           f"{per_batch} (micro-batch x data-parallel size now); skipping to the next whole batch")
        if int(state.get("seed", self.seed)) != self.seed:
            logger.warning(f"data loader resume: the checkpoint's shuffle seed {state.get('seed')} differs from "
                           f"this loader's {self.seed}; the sample order will differ")
        self.epoch, self.batches_yielded, self._resume = epoch, skip, None
        if epoch >= 0 and skip < self._epoch_length():
            self._resume = (epoch, skip)  # the next iter() re-enters ``epoch`` at batch ``skip``

    def _epoch_length(self) -> float:
        try:
            return len(self)
        except TypeError:  # an iterable dataset without __len__
            return float("inf")
