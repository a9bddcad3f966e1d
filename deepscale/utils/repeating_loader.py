"""An iterator wrapper that restarts its loader when it is exhausted."""


class RepeatingLoader:
    """Wrap an iterable (usually a DataLoader) so iteration never stops.

    When the wrapped loader is exhausted, a new iterator is created; if the loader has a
    ``sampler`` with ``set_epoch`` (a ``DistributedSampler``), the epoch is advanced first so
    shuffling differs between passes.

    Args:
        loader: any re-iterable object.
    """

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.data_iter = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.data_iter)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "sampler", None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            self.data_iter = iter(self.loader)
            return next(self.data_iter)
