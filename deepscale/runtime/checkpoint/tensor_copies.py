"""Copies of tensors that are safe to hand to ``torch.save``."""
import torch


def clone_tensors_for_torch_save(item, device: torch.device = torch.device("cpu")):
    """Return ``item`` with every tensor replaced by a detached copy on ``device``.

    ``torch.save`` writes a view's whole storage, so saving a state dict whose tensors are views
    of flat buffers (ZeRO, fused parameters) can write far more than the tensors themselves;
    cloning gives each tensor its own storage of exactly its size. Lists, tuples and dicts are
    walked recursively (their types are kept); other values are returned as they are.

    Args:
        item: a tensor, or a (nested) list/tuple/dict holding tensors.
        device: where the copies live. Default CPU.
    """
    if torch.is_tensor(item):
        return item.detach().clone().to(device)
    if isinstance(item, list):
        return [clone_tensors_for_torch_save(v, device) for v in item]
    if isinstance(item, tuple):
        return tuple(clone_tensors_for_torch_save(v, device) for v in item)
    if isinstance(item, dict):
        copied = type(item)() if type(item) is not dict else {}
        for key, value in item.items():
            copied[key] = clone_tensors_for_torch_save(value, device)
        if hasattr(item, "_metadata"):  # state dicts carry per-module versions
            copied._metadata = item._metadata
        return copied
    return item
