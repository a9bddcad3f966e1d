"""The executor of the NVMe swap plan: masters and optimizer states on disk, one sub-group at a time.

See ``swap_plan.py`` for the walk. Files (``swap_file.py``) are named ``sg<i>.master`` and
``sg<i>.<state key>`` (``exp_avg``, ``exp_avg_sq``, ``sum``, ...). A sub-group's states are
created by the optimizer at its first update (so an untrained sub-group has only its master on
disk) and their elementwise keys are learned then; non-elementwise entries (Adam's ``step``)
stay in memory per sub-group.
"""
import time
from typing import Callable, Dict, List

import torch

from deepscale.runtime.offload.host_memory import host_empty
from deepscale.runtime.offload.host_optimizer import sync_groups
from deepscale.runtime.offload.swap_file import SwapFiles
from deepscale.runtime.offload.swap_plan import (READ, UPDATE, WAIT_READ, WAIT_WRITE, WRITE, SubGroup,
                                                 check_schedule, split_sub_groups, swap_schedule)

MASTER = "master"


def _is_elementwise(value, numel: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.numel() == numel


class NvmeStates:
    """fp32 masters and optimizer states of some slabs, kept in swap files.

    Args:
        files: the rank's :class:`SwapFiles`.
        slab_numels: length of every slab (master) this object stores; slabs not listed are not its.
        sub_group_size, buffer_count, pipeline_read, pipeline_write: the walk (``swap_plan.py``).
        pin_memory: pin the sub-group buffers.
    """

    def __init__(self, files: SwapFiles, slab_numels: Dict[int, int], sub_group_size: int, buffer_count: int,
                 pipeline_read: bool = False, pipeline_write: bool = False, pin_memory: bool = False):
        self.files = files
        self.slabs = sorted(slab_numels)
        numels = [slab_numels[s] for s in self.slabs]
        self.sub_groups: List[SubGroup] = [SubGroup(sg.index, self.slabs[sg.slab], sg.start, sg.numel)
                                           for sg in split_sub_groups(numels, sub_group_size)]
        self.schedule = swap_schedule(len(self.sub_groups), buffer_count, pipeline_read, pipeline_write)
        check_schedule(self.schedule, len(self.sub_groups))
        self.buffer_count, self.pin = buffer_count, pin_memory
        self.max_numel = max((sg.numel for sg in self.sub_groups), default=0)
        self._buffers: Dict[tuple, torch.Tensor] = {}  # (buffer index, key) -> padded host tensor
        self.state_keys: List[str] = []  # elementwise keys, learned at the first update
        self._initialized = [False] * len(self.sub_groups)
        self._scalars: List[dict] = [{} for _ in self.sub_groups]
        self._params = [torch.nn.Parameter(torch.empty(0)) for _ in self.sub_groups]
        #: timings and bytes of the last step: swap_in_wait_s, optimizer_s, swap_out_wait_s, step_s,
        #: bytes_read, bytes_written (benchmarks/bench_offload_flagship.py reports them)
        self.last_step_stats: Dict[str, float] = {}

    # --- buffers --------------------------------------------------------------------------
    def _buffer(self, index: int, key: str) -> torch.Tensor:
        found = self._buffers.get((index, key))
        if found is None:
            numel = self.files.padded_numel(self.max_numel, torch.float32)
            found = self._buffers[(index, key)] = host_empty(numel, torch.float32, self.pin)
        return found

    def _name(self, sg: SubGroup, key: str) -> str:
        return f"sg{sg.index}.{key}"

    def _keys_on_disk(self, sg: SubGroup) -> List[str]:
        return [MASTER] + (self.state_keys if self._initialized[sg.index] else [])

    # --- initial masters ------------------------------------------------------------------
    def store_masters(self, slab: int, values: torch.Tensor) -> None:
        """Write the initial fp32 master of ``slab`` (1-D, any device) to its sub-group files."""
        for sg in self.sub_groups:
            if sg.slab == slab:
                buf = self._buffer(0, MASTER)
                buf[:sg.numel].copy_(values.detach().reshape(-1)[sg.start:sg.start + sg.numel])
                self.files.write(self._name(sg, MASTER), buf, sg.numel)
                self.files.wait_writes()

    # --- the step -------------------------------------------------------------------------
    def step(self, stepper, basic, group_of_slab: Dict[int, int], grads: Dict[int, torch.Tensor],
             publish: Callable[[int, int, torch.Tensor], None]) -> None:
        """Update every sub-group: read, ``stepper`` step, publish, write back (``self.schedule``).

        Args:
            stepper: the host optimizer (``host_optimizer.py``), sharing ``basic.state``.
            basic: the user's optimizer (hyperparameters per group).
            group_of_slab: slab -> optimizer param group.
            grads: slab -> its (unscaled, clipped) fp32 gradient on the host.
            publish: ``publish(slab, start, values)`` copies updated master values into the model.
        """
        timer = time.perf_counter
        stats = {"swap_in_wait_s": 0.0, "optimizer_s": 0.0, "swap_out_wait_s": 0.0, "step_s": -timer(),
                 "bytes_read": -self.files.bytes_read, "bytes_written": -self.files.bytes_written}
        for action in self.schedule:
            sg = self.sub_groups[action.sub_group]
            start = timer()
            if action.kind == READ:
                for key in self._keys_on_disk(sg):
                    self.files.read(self._name(sg, key), self._buffer(action.buffer, key), sg.numel)
            elif action.kind == WAIT_READ:
                self.files.wait_reads()
                for key in self._keys_on_disk(sg):
                    self.files.verify(self._name(sg, key), self._buffer(action.buffer, key))
                stats["swap_in_wait_s"] += timer() - start
            elif action.kind == UPDATE:
                self._update(sg, action.buffer, stepper, basic, group_of_slab[sg.slab], grads[sg.slab])
                publish(sg.slab, sg.start, self._buffer(action.buffer, MASTER)[:sg.numel])
                stats["optimizer_s"] += timer() - start
            elif action.kind == WRITE:
                for key in self._keys_on_disk(sg):
                    self.files.write(self._name(sg, key), self._buffer(action.buffer, key), sg.numel)
            elif action.kind == WAIT_WRITE:
                self.files.wait_writes()
                stats["swap_out_wait_s"] += timer() - start
        stats["step_s"] += timer()
        stats["bytes_read"] += self.files.bytes_read
        stats["bytes_written"] += self.files.bytes_written
        self.last_step_stats = stats

    def _update(self, sg: SubGroup, buf: int, stepper, basic, group_index: int, grad: torch.Tensor) -> None:
        param = self._params[sg.index]
        param.data = self._buffer(buf, MASTER)[:sg.numel]
        param.grad = grad[sg.start:sg.start + sg.numel]
        state = dict(self._scalars[sg.index])
        if self._initialized[sg.index]:
            state.update({key: self._buffer(buf, key)[:sg.numel] for key in self.state_keys})
        basic.state[param] = state
        params = [[] for _ in basic.param_groups]
        params[group_index] = [param]
        try:
            sync_groups(stepper, basic, params)
            stepper.step()
            self._absorb(sg, buf, basic.state[param])
        finally:
            basic.state.pop(param, None)
            param.grad = None
            param.data = torch.empty(0)

    def _absorb(self, sg: SubGroup, buf: int, state: dict) -> None:
        """Keep the updated state: elementwise tensors into the buffer (to be written), the rest in memory."""
        keys = [k for k, v in state.items() if _is_elementwise(v, sg.numel)]
        if not self.state_keys:
            self.state_keys = keys
        elif sorted(keys) != sorted(self.state_keys):
            raise RuntimeError(f"optimizer state keys changed between sub-groups: {keys} vs {self.state_keys}")
        for key in keys:
            dst = self._buffer(buf, key)[:sg.numel]
            if state[key].data_ptr() != dst.data_ptr():
                dst.copy_(state[key].reshape(-1))
        self._scalars[sg.index] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()
                                   if k not in keys}
        self._initialized[sg.index] = True

    # --- whole slabs in memory (checkpoints, offload_states) -----------------------------------
    @torch.no_grad()
    def load_slab(self, slab: int) -> (torch.Tensor, dict):
        """Read ``slab``'s master and states into fresh host tensors; returns ``(master, state dict)``."""
        sgs = [sg for sg in self.sub_groups if sg.slab == slab]
        numel = sum(sg.numel for sg in sgs)
        master = torch.empty(numel, dtype=torch.float32)
        keys = self.state_keys if all(self._initialized[sg.index] for sg in sgs) else []
        state = {key: torch.empty(numel, dtype=torch.float32) for key in keys}
        for sg in sgs:
            for key in [MASTER] + keys:
                buf = self._buffer(0, key)
                self.files.read(self._name(sg, key), buf, sg.numel)
                self.files.wait_reads()
                self.files.verify(self._name(sg, key), buf)
                (master if key == MASTER else state[key])[sg.start:sg.start + sg.numel].copy_(buf[:sg.numel])
        if keys and sgs:
            state.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in self._scalars[sgs[0].index].items()})
        return master, state

    @torch.no_grad()
    def save_slab(self, slab: int, master: torch.Tensor, state: dict) -> None:
        """Write ``slab``'s master and (elementwise, full-length) states back to its files."""
        sgs = [sg for sg in self.sub_groups if sg.slab == slab]
        numel = master.numel()
        keys = [k for k, v in state.items() if _is_elementwise(v, numel)]
        if keys and not self.state_keys:
            self.state_keys = keys
        scalars = {k: v for k, v in state.items() if k not in keys}
        for sg in sgs:
            for key in [MASTER] + (self.state_keys if keys else []):
                src = master if key == MASTER else state[key]
                buf = self._buffer(0, key)
                buf[:sg.numel].copy_(src.reshape(-1)[sg.start:sg.start + sg.numel])
                self.files.write(self._name(sg, key), buf, sg.numel)
                self.files.wait_writes()
            self._initialized[sg.index] = bool(keys)
            self._scalars[sg.index] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()}

    def release_buffers(self) -> None:
        """Free the sub-group buffers (they are allocated again on the next use)."""
        self._buffers.clear()
