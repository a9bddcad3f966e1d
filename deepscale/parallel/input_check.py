"""Debug check that every tensor-parallel rank feeds the model the same batch.

Tensor-parallel ranks compute one model replica together, so they must see identical inputs; a
data loader sharded by global rank instead of data-parallel rank silently trains on garbage.
With ``DEEPSCALE_TP_DEBUG=1`` in the environment, ``deepscale.initialize`` installs
:func:`check_same_inputs` on the model: each forward compares a digest (shapes and sums) of the
tensor inputs across the group and raises ``ValueError`` naming the ranks that differ. It costs
one small all-gather per forward, so it is off by default.
"""
import os

import torch

from deepscale import comm as dist
from deepscale.parallel.mappings import group_size

DEBUG_ENV = "DEEPSCALE_TP_DEBUG"


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _digest(args, kwargs) -> torch.Tensor:
    values = []
    for t in _tensors((args, kwargs)):
        values += [float(t.numel()), float(t.detach().double().sum()) if t.numel() else 0.0]
    return torch.tensor(values or [0.0], dtype=torch.float64)


def check_same_inputs(module: torch.nn.Module, group):
    """Install the check on ``module`` (a forward pre-hook); returns the hook handle."""
    world = group_size(group)

    def hook(_module, args, kwargs):
        mine = _digest(args, kwargs)
        sizes = torch.tensor([float(mine.numel())])
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        longest = int(max(s.item() for s in all_sizes))
        padded = torch.cat([mine, mine.new_full((longest - mine.numel(),), float("nan"))])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        differ = [r for r, p in enumerate(parts) if not torch.equal(p.nan_to_num(-1.0), parts[0].nan_to_num(-1.0))]
        if differ:
            raise ValueError(f"tensor-parallel ranks {differ} (positions in the tensor-parallel group) got "
                             "different inputs than position 0: every tensor-parallel rank must see the same batch; "
                             "shard the data by data-parallel rank (engine.dp_rank), not by global rank")
        return None

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "0").strip().lower() not in ("", "0", "false", "no")
