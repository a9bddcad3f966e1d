"""The memory planner: bytes a ZeRO config holds on the device, in host memory and on NVMe.

Note: the arithmetic (per rank; Psi trainable parameters, N data-parallel ranks, ``part`` =
Psi / N this rank's partition, ``r`` = ``offload_optimizer.ratio``):

* device: model parameters (Psi, or part at stage 3 plus two gathered copies of the largest
  layer), gradients (Psi at stage 0-1, part at stage 2, part at stage 3 unless offloaded),
  and, for the share of the step kept there (all without offload, ``1 - r`` with it), fp32
  masters and optimizer states;
* host (offload): the fp32 gradient partition of the offloaded share (``r * part``), plus with
  ``device: cpu`` its masters and states, with ``device: nvme`` the sub-group buffers
  (``min(buffer_count, sub-groups) x (1 + state tensors) x min(sub_group_size, r * part)``
  fp32);
* NVMe: masters and states of the offloaded share, padded to the aio block size.

Per node multiplies by the ranks on the node. :func:`plan_memory` is pure (the figures can be
printed and tested without a process); :func:`check_fits` compares a plan with what the machine
has, and :func:`check_offload_plan` is what the ZeRO optimizers run before allocating: it logs the
plan and refuses, on every rank, a config that cannot fit. ``estimate_zero2/3_model_states_mem_needs``
are this arithmetic with mixed-precision Adam's sizes (``MIXED_PRECISION_ADAM``).
"""
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from deepscale.runtime.offload.settings import OptimizerOffloadSettings

GiB = float(1 << 30)


@dataclass(frozen=True)
class ByteSizes:
    """Bytes per element of each kind of model state.

    Args:
        param: model parameters (2 for fp16/bf16, 4 for fp32).
        grad: gradients on the device (the accumulation dtype).
        master: fp32 master weights (0 when they are the model's own fp32 storage).
        state: optimizer states per element (Adam/AdamW 8, Adagrad and Lion 4, SGD 0 or 4).
        host_grad: the gradient partition on the host when offloaded (fp32: 4).
        state_tensors: elementwise state tensors per master (Adam 2).
    """

    param: int = 2
    grad: int = 4
    master: int = 4
    state: int = 8
    host_grad: int = 4
    state_tensors: int = 2


#: Mixed-precision Adam as in the ZeRO paper (2-byte parameters and gradients, K = 12).
MIXED_PRECISION_ADAM = ByteSizes(param=2, grad=2, master=4, state=8, host_grad=4, state_tensors=2)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of model states per rank and per node, by tier, with the breakdown behind them."""

    device_bytes: float
    host_bytes: float
    nvme_bytes: float
    ranks_per_node: int
    detail: dict = field(default_factory=dict)

    @property
    def host_bytes_per_node(self) -> float:
        return self.host_bytes * self.ranks_per_node

    @property
    def nvme_bytes_per_node(self) -> float:
        return self.nvme_bytes * self.ranks_per_node

    def describe(self) -> str:
        """One line per tier, in GiB."""
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.detail.items() if v)
        return (f"per rank: device {fmt_bytes(self.device_bytes)}, host {fmt_bytes(self.host_bytes)}, "
                f"NVMe {fmt_bytes(self.nvme_bytes)}; per node ({self.ranks_per_node} rank(s)): host "
                f"{fmt_bytes(self.host_bytes_per_node)}, NVMe {fmt_bytes(self.nvme_bytes_per_node)} "
                f"[per rank: {parts}]")


def fmt_bytes(nbytes: float) -> str:
    """``nbytes`` in GiB, MiB or KiB, whichever shows it with at least two significant digits."""
    for unit, size in (("GiB", GiB), ("MiB", float(1 << 20))):
        if nbytes >= 0.1 * size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / 1024:.2f} KiB"


def _padded(nbytes: float, block: int) -> float:
    return -(-int(nbytes) // block) * block if nbytes else 0.0


def plan_memory(num_params: int, stage: int, world_size: int = 1, ranks_per_node: int = 1,
                sizes: ByteSizes = ByteSizes(), offload: OptimizerOffloadSettings = OptimizerOffloadSettings(),
                largest_layer: int = 0) -> MemoryPlan:
    """The :class:`MemoryPlan` of a config (see the module Note).

    Args:
        num_params: Psi, trainable parameters of the model.
        stage: ZeRO stage 0-3.
        world_size: data-parallel ranks N. Default 1.
        ranks_per_node: ranks sharing a node's host memory and NVMe. Default 1.
        sizes: bytes per element (:class:`ByteSizes`). Default mixed precision with fp32 gradients.
        offload: the optimizer offload settings. Default none.
        largest_layer: parameters of the largest module (stage 3 gathers it). Default 0.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1 or ranks_per_node < 1:
        raise ValueError(f"world_size and ranks_per_node must be positive, got {world_size}, {ranks_per_node}")
    psi = float(num_params)
    part = psi / world_size if stage >= 1 else psi
    ratio = offload.ratio if offload.enabled else 0.0
    offloaded, kept = ratio * part, (1.0 - ratio) * part
    d = {"params": sizes.param * (part if stage == 3 else psi) + (2 * sizes.param * largest_layer if stage == 3 else 0)}
    grads_on_device = psi if stage <= 1 else (kept if stage == 3 else part)
    d["grads"] = sizes.grad * grads_on_device
    d["device_masters_and_states"] = (sizes.master + sizes.state) * kept
    host = nvme = 0.0
    if offload.enabled:
        d["host_grads"] = sizes.host_grad * offloaded
        host += d["host_grads"]
        if offload.nvme:
            largest = min(offload.sub_group_size, offloaded)
            buffers = min(offload.buffer_count, -(-int(offloaded) // offload.sub_group_size))
            d["swap_buffers"] = buffers * (1 + sizes.state_tensors) * 4 * largest
            host += d["swap_buffers"]
            nvme = _padded((sizes.master + sizes.state) * offloaded, offload.aio.block_size)
            d["nvme_masters_and_states"] = nvme
        else:
            d["host_masters_and_states"] = (sizes.master + sizes.state) * offloaded
            host += d["host_masters_and_states"]
    device = d["params"] + d["grads"] + d["device_masters_and_states"]
    return MemoryPlan(device, host, nvme, ranks_per_node, d)


def check_fits(plan: MemoryPlan, offload: OptimizerOffloadSettings, host_available: Optional[float],
               nvme_free: Optional[float]) -> None:
    """Raise ``ValueError`` with the figures when ``plan`` does not fit what the node has.

    Args:
        plan: the plan.
        offload: the settings (for the path and what to change).
        host_available: bytes of host memory available on the node (None: not checked).
        nvme_free: bytes free under ``nvme_path`` (None: not checked).
    """
    problems = []
    if host_available is not None and plan.host_bytes_per_node > host_available:
        problems.append(f"host memory: {fmt_bytes(plan.host_bytes_per_node)} needed per node "
                        f"({plan.ranks_per_node} rank(s) x {fmt_bytes(plan.host_bytes)}) but "
                        f"{fmt_bytes(host_available)} is available; use offload_optimizer.device='nvme', more "
                        f"nodes, or (NVMe) a smaller sub_group_size / buffer_count")
    if offload.nvme and nvme_free is not None and plan.nvme_bytes_per_node > nvme_free:
        problems.append(f"NVMe: {fmt_bytes(plan.nvme_bytes_per_node)} of swap files needed per node "
                        f"({plan.ranks_per_node} rank(s) x {fmt_bytes(plan.nvme_bytes)}) but "
                        f"{fmt_bytes(nvme_free)} is free under offload_optimizer.nvme_path={offload.nvme_path!r}; "
                        f"point nvme_path at a larger disk, use more nodes, or offload_optimizer.device='cpu'")
    if problems:
        raise ValueError("zero_optimization.offload_optimizer: this config cannot fit: " + "; ".join(problems)
                         + f" ({plan.describe()})")


def available_host_bytes() -> Optional[float]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_disk_bytes(path: str) -> Optional[float]:
    """Free bytes on the file system of ``path`` (its nearest existing parent); None if unknown."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return float(shutil.disk_usage(probe).free)
    except OSError:
        return None


def sizes_for(model_dtype: torch.dtype, optimizer, grad_dtype: torch.dtype = torch.float32) -> ByteSizes:
    """The :class:`ByteSizes` of a training run: model dtype, optimizer family, gradient dtype."""
    name = type(optimizer).__name__.lower()
    tensors = 2 if "adam" in name else 1 if any(k in name for k in ("adagrad", "lion", "sgd", "rmsprop")) else 2
    if "sgd" in name and not optimizer.defaults.get("momentum"):
        tensors = 0
    itemsize = torch.empty((), dtype=model_dtype).element_size()
    return ByteSizes(param=itemsize, grad=torch.empty((), dtype=grad_dtype).element_size(), master=4,
                     state=4 * tensors, host_grad=4, state_tensors=tensors)


def check_offload_plan(offload: OptimizerOffloadSettings, num_params: int, stage: int, world_size: int,
                       sizes: ByteSizes, group=None, largest_layer: int = 0) -> MemoryPlan:
    """Plan, log, and refuse on every rank a config that cannot fit (before anything is allocated).

    Every rank checks its own node; one all-reduce tells all ranks whether any refused, so a
    refusal on one node is an error everywhere instead of a hang in the next collective.
    """
    from deepscale import comm as dist
    from deepscale.utils.logging import log_dist
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    plan = plan_memory(num_params, stage, world_size, ranks_per_node, sizes, offload, largest_layer)
    log_dist(f"offload_optimizer={offload.device} memory plan for {num_params / 1e6:.1f}M parameters at ZeRO stage "
             f"{stage} x {world_size} rank(s): {plan.describe()}", ranks=[0])
    error = None
    try:
        check_fits(plan, offload, available_host_bytes(), free_disk_bytes(offload.nvme_path) if offload.nvme else None)
    except ValueError as err:
        error = err
    if world_size > 1 and dist.is_initialized():
        flag = torch.tensor([1.0 if error else 0.0])
        dist.all_reduce(flag, group=group)
        if flag.item() and error is None:
            error = ValueError(f"zero_optimization.offload_optimizer: this config cannot fit on another rank's node "
                               f"(see its error); this node's plan: {plan.describe()}")
    if error is not None:
        raise error
    return plan
