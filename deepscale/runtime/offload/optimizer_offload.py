"""ZeRO-Offload of the optimizer: fp32 masters, gradient partition and states on host or NVMe.

Note: what a ZeRO optimizer hands over. Each stage cuts this rank's fp32 masters into *slabs*
(stage 1/2: one per bucket chunk; stage 3: whole parameter shards of one param group, at most
``sub_group_size`` elements each) and gives :class:`OptimizerOffload` their initial values, their
param groups and a ``publish(slab, start, values)`` function that copies updated master values
into the model's storage (cast to the model dtype, host->device). From then on:

* ``masters[i]`` is the Parameter the user's optimizer sees in its ``param_groups``;
  ``grads[i]`` is where the stage writes slab ``i``'s reduced gradient (on the host, copied in
  bucket order while backward runs). With NVMe, ``masters[i]`` is an empty shell outside
  :meth:`resident`.
* ``step()`` (called by :class:`PrecisionOptimizer` after unscaling and clipping, in place of
  the torch step) updates every slab: Twin-Flow's device slabs (the last ``1 - ratio`` of the
  elements) with a copy of the user's optimizer where they live, host slabs with deepscale's CPU
  optimizer (``host_optimizer.py``), NVMe slabs sub-group by sub-group (``nvme_step.py``);
* ``publish()`` copies updated masters into the model (NVMe slabs were published during the walk).

Note: the delayed parameter update (DPU, Ren et al. 2021, "ZeRO-Offload", section 5). Off by
default. After ``delayed_param_update_warmup_steps`` ordinary steps, ``step()`` snapshots the
gradients and hyperparameters and runs the update on a background thread; the model keeps the
previous weights, so the forward and backward of step t+1 run on the weights of step t-1 while
the host updates to step t. ``publish()`` of the next step (or :meth:`flush`) waits for it and
copies the result in. This changes numerics (gradients are one step stale), exactly like
applying every update one step late.
"""
import os
import threading
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import torch

from deepscale import comm as dist
from deepscale.accelerator import get_accelerator
from deepscale.runtime.offload.host_memory import host_copy, host_zeros
from deepscale.runtime.offload.host_optimizer import device_stepper, host_stepper, sync_groups
from deepscale.runtime.offload.settings import OptimizerOffloadSettings

Publish = Callable[[int, int, torch.Tensor], None]
SHARE_HOST_ENV = "DEEPSCALE_OFFLOAD_SHARE_HOST"


def device_slabs(numels: Sequence[int], ratio: float) -> List[bool]:
    """Which slabs stay on the device under Twin-Flow ``ratio`` (the host's share of the elements).

    The last slabs whose total does not exceed ``(1 - ratio)`` of all elements stay on the device.
    """
    total = sum(numels)
    budget = (1.0 - ratio) * total
    out, used = [False] * len(numels), 0
    for index in reversed(range(len(numels))):
        if used + numels[index] <= budget + 1e-9 * total:
            out[index], used = True, used + numels[index]
    return out


class OptimizerOffload:
    """The offloaded masters, gradients and optimizer step of one ZeRO optimizer (see module Notes).

    Args:
        settings: the :class:`OptimizerOffloadSettings`.
        basic: the user's torch optimizer (its ``param_groups`` get the masters from the stage).
        initial_masters: this rank's fp32 values of every slab (1-D, any device).
        slab_groups: the optimizer param group of every slab.
        publish: ``publish(slab, start, values)``, see the module Note.
        rank, group: this rank (global rank names the swap directory) and the data-parallel group.
        grad_buffers: the stage's own fp32 gradient chunk of every slab; on a CPU accelerator
            they are used as the host gradients instead of copies (see :attr:`shares_host`). Default None.
    """

    def __init__(self, settings: OptimizerOffloadSettings, basic, initial_masters: Sequence[torch.Tensor],
                 slab_groups: Sequence[int], publish: Publish, rank: int = 0, group=None,
                 grad_buffers: Optional[Sequence[torch.Tensor]] = None):
        if settings.delayed_update and settings.nvme:
            raise ValueError("zero_optimization.offload_optimizer.delayed_param_update works with device 'cpu' only "
                             "(an NVMe step publishes sub-groups while it walks them); allowed with nvme: false")
        self.settings, self.basic, self.group = settings, basic, group
        self.slab_groups = list(slab_groups)
        self._publish_fn = publish
        numels = [int(m.numel()) for m in initial_masters]
        self.on_device = device_slabs(numels, settings.ratio)
        self.masters: List[torch.nn.Parameter] = []
        self.grads: List[torch.Tensor] = []
        self.nvme = None
        # Note: a CPU accelerator. When the model itself lives in host memory there is nothing
        # to move: the stage's fp32 masters and gradient chunks already are host tensors, so they
        # are used in place instead of copied (no extra memory, no copies per step). The
        # copying path, what GPUs run, is forced with DEEPSCALE_OFFLOAD_SHARE_HOST=0 (tests).
        # DPU updates the masters while the model computes with the previous weights: never shared.
        self.shares_host = os.environ.get(SHARE_HOST_ENV, "1") != "0" and not settings.delayed_update and all(
            m.device.type == "cpu" and m.dtype == torch.float32 and m.is_contiguous() for m in initial_masters)
        nvme_numels = {}
        for index, values in enumerate(initial_masters):
            own_grad = grad_buffers[index] if grad_buffers is not None else None
            share_grad = (self.shares_host and own_grad is not None and own_grad.dtype == torch.float32
                          and own_grad.device.type == "cpu")
            if settings.nvme and not self.on_device[index]:
                nvme_numels[index], master = numels[index], torch.nn.Parameter(torch.empty(0))
            elif self.shares_host:
                master = values if isinstance(values, torch.nn.Parameter) else torch.nn.Parameter(values.detach())
            elif self.on_device[index]:
                master = torch.nn.Parameter(values.detach().reshape(-1).float().clone())
            else:
                master = torch.nn.Parameter(host_copy(values, pin=settings.pin_memory))
            if share_grad:
                grad = own_grad
            elif self.on_device[index] and not settings.nvme:
                grad = torch.zeros(numels[index], dtype=torch.float32, device=values.device)
            else:
                grad = host_zeros(numels[index], pin=settings.pin_memory)
            self.masters.append(master)
            self.grads.append(grad)
        if nvme_numels:
            self._open_nvme(nvme_numels, initial_masters, rank)
        self.host_stepper = host_stepper(basic)
        self.device_stepper = device_stepper(basic)
        self._updated = [False] * len(self.masters)
        self._thread: Optional[threading.Thread] = None
        self._thread_error: Optional[BaseException] = None
        self.num_steps = 0
        self.offloaded_states = False

    def _open_nvme(self, numels: Dict[int, int], initial_masters, rank: int) -> None:
        from deepscale.runtime.offload.nvme_step import NvmeStates
        from deepscale.runtime.offload.swap_file import SwapFiles
        s = self.settings
        files = SwapFiles(s.nvme_path, "optimizer", rank, s.aio, debug=s.debug)
        self.nvme = NvmeStates(files, numels, s.sub_group_size, s.buffer_count, s.pipeline_read, s.pipeline_write,
                               s.pin_memory)
        for slab in numels:
            self.nvme.store_masters(slab, initial_masters[slab])
        self.nvme.release_buffers()

    # --- what the stage reads -------------------------------------------------------------
    def step_grads(self) -> List[torch.Tensor]:
        """The gradients the norm and the clipping run over (every slab's)."""
        # Device->host copies were started non_blocking during backward; the host reads them now.
        get_accelerator().synchronize()
        return list(self.grads)

    # --- the step -------------------------------------------------------------------------
    def _tier_params(self, device: bool) -> List[List[torch.Tensor]]:
        out = [[] for _ in self.basic.param_groups]
        for index, master in enumerate(self.masters):
            if self.on_device[index] == device and not (self.nvme is not None and not device):
                out[self.slab_groups[index]].append(master)
        return out

    @torch.no_grad()
    def step(self) -> None:
        """Update every slab from ``grads`` (already unscaled and clipped); see the module Note."""
        if self.flush():  # DPU: the previous update goes into the model before this one starts
            self._publish_updated()
        self.num_steps += 1
        for master, grad, on_device in zip(self.masters, self.grads, self.on_device):
            if on_device or self.nvme is None:
                master.grad = grad
        delayed = self.settings.delayed_update and self.num_steps > self.settings.delayed_update_warmup
        if delayed:
            self._start_delayed()
            return
        self._run_step(self.device_stepper, self.host_stepper)
        if self.nvme is not None:
            nvme_grads = {i: g for i, g in enumerate(self.grads) if not self.on_device[i]}
            group_of = {i: g for i, g in enumerate(self.slab_groups)}
            error = None
            try:
                self.nvme.step(self.host_stepper, self.basic, group_of, nvme_grads, self._publish_fn)
            except OSError as err:  # a full disk, an I/O error: every rank must hear of it
                error = err
            self._agree_no_swap_error(error)
        self._mark_updated()

    def _run_step(self, dev_stepper, cpu_stepper) -> None:
        device_params, host_params = self._tier_params(True), self._tier_params(False)
        if any(device_params):
            sync_groups(dev_stepper, self.basic, device_params)
            dev_stepper.step()
        if any(host_params):
            sync_groups(cpu_stepper, self.basic, host_params)
            cpu_stepper.step()

    def _mark_updated(self) -> None:
        for index in range(len(self.masters)):
            self._updated[index] = self.nvme is None or self.on_device[index]
        for master in self.masters:
            master.grad = None

    def _agree_no_swap_error(self, error: Optional[OSError]) -> None:
        # A full disk on one rank must stop every rank, never leave the others waiting in the
        # next collective: one flag per step tells every rank whether any rank failed.
        failed = error is not None
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            flag = torch.tensor([1.0 if failed else 0.0])
            dist.all_reduce(flag, group=self.group)
            failed = flag.item() > 0
        if error is not None:
            raise error
        if failed:
            raise OSError("NVMe optimizer swap failed on another rank (see its error, e.g. no space left under "
                          f"offload_optimizer.nvme_path={self.settings.nvme_path!r}); stopping this rank too")

    # --- delayed parameter update ---------------------------------------------------------
    def _start_delayed(self) -> None:
        # Snapshot what the main thread goes on changing: gradients (the next backward writes
        # them) and hyperparameters (the lr schedule steps right after this call).
        views = [torch.nn.Parameter(m.detach()) for m in self.masters]
        for view, grad in zip(views, self.grads):
            view.grad = grad.clone()
        state = {view: self.basic.state.setdefault(master, {}) for view, master in zip(views, self.masters)}
        steppers = []
        for stepper, device in ((self.device_stepper, True), (self.host_stepper, False)):
            copy_ = device_stepper(stepper)
            copy_.state = state
            params = [[] for _ in self.basic.param_groups]
            for index, view in enumerate(views):
                if self.on_device[index] == device:
                    params[self.slab_groups[index]].append(view)
            sync_groups(copy_, self.basic, params)
            steppers.append(copy_)
        for master in self.masters:
            master.grad = None

        def run():
            try:
                with torch.no_grad():
                    for stepper in steppers:
                        if any(g["params"] for g in stepper.param_groups):
                            stepper.step()
            except BaseException as err:  # re-raised in the main thread by flush()
                self._thread_error = err

        self._thread = threading.Thread(target=run, name="deepscale-delayed-update", daemon=True)
        self._thread.start()

    def flush(self) -> bool:
        """Finish a delayed update in flight (DPU); returns True when one was finished."""
        thread, self._thread = self._thread, None
        if thread is None:
            return False
        thread.join()
        if self._thread_error is not None:
            err, self._thread_error = self._thread_error, None
            raise RuntimeError("the delayed optimizer step failed on its background thread") from err
        self._updated = [True] * len(self.masters)
        return True

    @torch.no_grad()
    def _publish_updated(self) -> bool:
        published = False
        for index, updated in enumerate(self._updated):
            if updated:
                self._publish_fn(index, 0, self.masters[index].detach())
                self._updated[index] = False
                published = True
        return published

    def publish(self) -> None:
        """Copy the masters updated by the last step into the model (a no-op while a delayed update runs)."""
        if self._thread is None:
            self._publish_updated()

    def finish(self) -> bool:
        """Finish and publish a delayed update in flight; True when the model changed (gather it)."""
        return self.flush() and self._publish_updated()

    # --- whole states in memory (checkpoints) ---------------------------------------------
    @contextmanager
    def resident(self, writeback: bool = True):
        """While active, every NVMe slab's master and states are host tensors (``masters[i]``,
        ``basic.state[masters[i]]``); on exit they are written back (``writeback``) and dropped.

        Needs host memory for all of this rank's NVMe states at once (checkpoint save and load).
        """
        if self.nvme is None:
            yield
            return
        slabs = sorted({sg.slab for sg in self.nvme.sub_groups})
        for slab in slabs:
            master, state = self.nvme.load_slab(slab)
            self.masters[slab].data = master
            if state:
                self.basic.state[self.masters[slab]] = state
        try:
            yield
        finally:
            try:
                for slab in slabs:
                    master = self.masters[slab]
                    if writeback:
                        self.nvme.save_slab(slab, master.detach(), self.basic.state.get(master, {}))
                    master.data = torch.empty(0)
                    self.basic.state.pop(master, None)
            finally:
                self.nvme.release_buffers()

    def close(self) -> None:
        """Finish a delayed update and remove the swap files."""
        self.flush()
        if self.nvme is not None:
            self.nvme.files.close()
            self.nvme = None
