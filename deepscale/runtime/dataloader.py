"""The training data loader the engine builds when given ``training_data``."""
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset


class DeepScaleDataLoader:
    """A DataLoader over this rank's shard of a dataset; each new pass reshuffles.

    Each ``iter()`` starts a new epoch of the ``DistributedSampler`` so the order differs
    between passes but is identical on every run with the same seed.

    Args:
        dataset: a map-style ``Dataset`` (sharded by a DistributedSampler) or an
            ``IterableDataset`` (used as is; sharding is then the dataset's job).
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
        self.epoch = -1
        if isinstance(dataset, IterableDataset):
            self.sampler = None
        else:
            self.sampler = DistributedSampler(dataset, num_replicas=dp_world_size, rank=dp_rank,
                                              shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, collate_fn=collate_fn,
                                 drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory)

    def __iter__(self):
        self.epoch += 1
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` use ``epoch`` (e.g. after resuming from a checkpoint)."""
        self.epoch = epoch - 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
