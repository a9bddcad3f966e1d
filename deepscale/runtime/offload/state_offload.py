"""``engine.offload_states()`` / ``engine.reload_states()``: free device memory between phases.

For RL-style loops that alternate training with generation, DeepSpeed lets the user move the
training states off the device and back. Here the states are moved by replacing each tensor's
storage (``.data`` of a master Parameter, the entries of the optimizer state dicts), so the
optimizer, its state keys and the engine's references stay valid, and ``reload_states`` puts
every moved tensor back on the device it came from.

What moves: ``"optim_states"`` (the optimizer's elementwise states) and ``"hp_params"`` (the
fp32 masters), where they are not already on ``device`` and not storage shared with the model
(an fp32 model's masters at stages 1-2 are the model's own chunks). Gradient buffers and the
model's (low-precision) parameters stay where they are: ``"lp_params"``, ``"lp_grads"`` and
``"contiguous_grad_buffer"`` are accepted names that move nothing in this version.
"""
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from deepscale.runtime.offload.host_memory import host_empty

STATE_TYPES = ("optim_states", "hp_params", "lp_params", "lp_grads", "contiguous_grad_buffer")
MOVED_TYPES = ("optim_states", "hp_params")


def _names(include: Optional[Iterable]) -> List[str]:
    if include is None:
        return list(STATE_TYPES)
    names = [getattr(item, "value", item) for item in include]
    bad = [n for n in names if n not in STATE_TYPES]
    if bad:
        raise ValueError(f"offload_states(include=...): unknown state type(s) {bad}; allowed: {list(STATE_TYPES)}")
    return names


def _device_name(device) -> str:
    name = str(getattr(device, "value", device))
    if name != "cpu":
        raise ValueError(f"offload_states(device=...): only 'cpu' is supported, got {name!r}")
    return name


class StateOffloader:
    """Moves a training optimizer's states to the host and back (see the module Note)."""

    def __init__(self):
        self._moved: List[Tuple[object, object, torch.device]] = []  # (holder, key, original device)
        self.offloaded = False

    def _move(self, tensor: torch.Tensor, pin: bool, non_blocking: bool) -> torch.Tensor:
        out = host_empty(tensor.numel(), tensor.dtype, pin).view(tensor.shape)
        out.copy_(tensor, non_blocking=non_blocking)
        return out

    @torch.no_grad()
    def offload(self, train_opt, include=None, device="cpu", pin_memory=True, non_blocking=False) -> Dict[str, int]:
        """Move the states named in ``include`` (default all) to ``device``; returns bytes moved per type."""
        names, _ = _names(include), _device_name(device)
        if self.offloaded:
            raise RuntimeError("offload_states(): the states are already offloaded; call reload_states() first")
        shared = {p.detach().untyped_storage().data_ptr() for p in train_opt._module.parameters()}
        for buf in getattr(train_opt, "model_buffers", []):
            shared.add(buf.untyped_storage().data_ptr())
        moved = {name: 0 for name in names}
        self.offloaded = True
        basic = train_opt.basic_optimizer
        masters = getattr(train_opt, "masters", None)
        if masters is None:  # stage 0: the precision wrapper's masters (the model itself in fp32)
            masters = train_opt.precision.master_params if train_opt.precision is not None else []
        for master in (masters if "hp_params" in names else []):
            if master.device.type != "cpu" and master.untyped_storage().data_ptr() not in shared:
                self._moved.append((master, None, master.device))
                master.data = self._move(master.detach(), pin_memory, non_blocking)
                moved["hp_params"] += master.numel() * master.element_size()
        for state in (basic.state.values() if "optim_states" in names and basic is not None else []):
            for key, value in state.items():
                if torch.is_tensor(value) and value.device.type != "cpu":
                    self._moved.append((state, key, value.device))
                    state[key] = self._move(value, pin_memory, non_blocking)
                    moved["optim_states"] += value.numel() * value.element_size()
        return moved

    @torch.no_grad()
    def reload(self, non_blocking: bool = False) -> None:
        """Move every offloaded tensor back to the device it came from."""
        for holder, key, device in self._moved:
            if key is None:
                holder.data = holder.detach().to(device, non_blocking=non_blocking)
            else:
                holder[key] = holder[key].to(device, non_blocking=non_blocking)
        self._moved, self.offloaded = [], False
