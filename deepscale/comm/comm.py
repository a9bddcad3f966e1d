"""Process-group set-up and thin wrappers over torch.distributed.

The wrappers mirror the torch.distributed names users already call, so
``import deepscale.comm as dist`` works as a drop-in. They add two things: a single
``init_distributed`` that understands every launcher's environment, and functions that
behave sensibly before initialisation (rank 0 of a world of 1). Every collective is also
registered with the process's collective watchdog (``watchdog.py``), which reports (or aborts
on) one that waits too long.
"""
import datetime
import os
from typing import Optional

import torch
import torch.distributed as _dist

from deepscale.accelerator import get_accelerator
from deepscale.comm import env_discovery
from deepscale.comm.comms_hook import logged
from deepscale.comm.watchdog import (DEFAULT_TIMEOUT_S as DEFAULT_WATCHDOG_TIMEOUT_S, CollectiveWatchdog,
                                     WatchedWork, settings_from_env)
from deepscale.utils.logging import logger

# Same default as torch: 30 minutes before a collective gives up.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

ReduceOp = _dist.ReduceOp


def is_available() -> bool:
    return _dist.is_available()


def is_initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def init_distributed(dist_backend: Optional[str] = None,
                     auto_mpi_discovery: bool = True,
                     distributed_port: int = 29500,
                     verbose: bool = True,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                     init_method: Optional[str] = None,
                     dist_init_required: Optional[bool] = None,
                     config=None,
                     rank: int = -1,
                     world_size: int = -1) -> None:
    """Initialise the default process group once, from whatever launcher started us.

    Args:
        dist_backend: torch.distributed backend; default is the accelerator's (gloo on CPU,
            nccl on CUDA).
        auto_mpi_discovery: read OpenMPI/MPICH/Slurm variables when RANK/WORLD_SIZE are absent.
        distributed_port: rendezvous port when MASTER_PORT is not set. Default 29500.
        verbose: log the chosen rank, world size and backend.
        timeout: collective timeout. Default 30 minutes.
        init_method: a torch init_method URL; default ``env://``.
        dist_init_required: ``False`` skips initialisation; ``None`` initialises if needed.
        config: accepted for DeepSpeed compatibility; unused.
        rank, world_size: explicit values that override the environment (-1: read it).

    An already-initialised default group (the user called torch.distributed themselves) is
    reused as is.
    """
    if dist_init_required is False:
        return
    if is_initialized():
        if verbose:
            logger.debug("torch.distributed is already initialised; reusing the default group")
        return
    penv = env_discovery.discover() if auto_mpi_discovery else env_discovery.discover(
        {k: v for k, v in os.environ.items() if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                                                       "MASTER_ADDR", "MASTER_PORT")})
    if rank >= 0 or world_size > 0:
        if rank < 0 or world_size <= 0:
            raise ValueError(f"init_distributed: pass both rank and world_size (got rank={rank}, "
                             f"world_size={world_size})")
        if rank >= world_size:
            raise ValueError(f"init_distributed: rank {rank} is not below world_size {world_size}")
        penv = env_discovery.ProcessEnv(rank, world_size, penv.local_rank, penv.local_size,
                                        penv.master_addr, penv.master_port, "arguments")
    if penv.world_size > 1 and penv.source in ("openmpi", "mpich", "slurm") and not penv.master_addr:
        logger.warning(f"{penv.source} launch without MASTER_ADDR: using {env_discovery.DEFAULT_MASTER_ADDR}; "
                       "set MASTER_ADDR to the first node's address for multi-node jobs")
    lone = penv.world_size == 1 and init_method is None and "MASTER_PORT" not in os.environ
    env_discovery.export(penv, distributed_port)
    backend = dist_backend or get_accelerator().communication_backend_name()
    if backend == "nccl":
        get_accelerator().set_device(penv.local_rank)
    if verbose:
        logger.info(f"initialising torch.distributed: backend={backend} rank={penv.rank} "
                    f"world_size={penv.world_size} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                    f"(from {penv.source} variables)")
    if lone:
        # A lone process needs no rendezvous: an in-memory store avoids claiming a TCP port that
        # another single-process job on the machine may hold.
        _dist.init_process_group(backend=backend, store=_dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    _dist.init_process_group(backend=backend, init_method=init_method or "env://", timeout=timeout,
                             rank=penv.rank, world_size=penv.world_size)


def destroy_process_group(group=None) -> None:
    global _watchdog
    if group is None and _watchdog is not None:  # its store and ranks belong to the group
        _watchdog.close()
        _watchdog = None
    if is_initialized():
        _dist.destroy_process_group(group)


def get_rank(group=None) -> int:
    return _dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return _dist.get_world_size(group) if is_initialized() else 1


def get_local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK), 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_global_rank(group, group_rank: int) -> int:
    return _dist.get_global_rank(group, group_rank) if group is not None else group_rank


def get_backend(group=None) -> str:
    return _dist.get_backend(group)


def new_group(ranks=None, timeout=None, backend=None):
    return _dist.new_group(ranks=ranks, timeout=timeout, backend=backend)


# --- the collective watchdog (comm/watchdog.py) ---------------------------------------------
_watchdog: Optional[CollectiveWatchdog] = None


def _default_store():
    try:
        return _dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def configure_watchdog(timeout_s: Optional[float] = None, action: Optional[str] = None,
                       poll_s: Optional[float] = None) -> CollectiveWatchdog:
    """(Re)configure this process's collective watchdog, which covers every collective issued
    through ``deepscale.comm``.

    Args:
        timeout_s: seconds a collective may wait before it is reported; 0 disables. Default 300.
        action: ``"log"`` (report on every rank that waits) or ``"abort"`` (report, then exit
            the process with code 75). Default ``"log"``.
        poll_s: how often the watchdog thread looks. Default: a quarter of the timeout, at most 1 s.

    ``DEEPSCALE_WATCHDOG_TIMEOUT`` and ``DEEPSCALE_WATCHDOG_ACTION`` override both arguments.
    Call after the process group exists (``deepscale.initialize`` does, from the config's
    ``collective_watchdog`` section).
    """
    global _watchdog
    timeout_s, action = settings_from_env(DEFAULT_WATCHDOG_TIMEOUT_S if timeout_s is None else timeout_s,
                                          action or "log")
    previous = _watchdog
    step = previous.step if previous is not None else 0
    if previous is not None:
        previous.close()
    _watchdog = CollectiveWatchdog(timeout_s, action, rank=get_rank(), world_size=get_world_size(),
                                   store=_default_store() if is_initialized() else None, poll_s=poll_s)
    _watchdog.step = step
    return _watchdog


def get_watchdog() -> CollectiveWatchdog:
    """This process's collective watchdog (created with the defaults on first use)."""
    return _watchdog if _watchdog is not None else configure_watchdog()


def set_training_step(step: int) -> None:
    """Tell the watchdog which training step the next collectives belong to (for its reports)."""
    get_watchdog().step = int(step)


def collective_label(text):
    """Context manager: collectives issued inside are reported with ``text`` (what they are for;
    a string, or a zero-argument callable that returns it, formatted only when needed)."""
    return get_watchdog().label(text)


def _watched(name: str, tensor, async_op: bool, call):
    watchdog = get_watchdog()
    if not watchdog.enabled:
        return call()
    record = watchdog.issued(name, tensor)
    if async_op:
        work = call()
        return WatchedWork(work, record, watchdog) if work is not None else None
    key = watchdog.begin_wait(record)
    try:
        return call()
    finally:
        watchdog.end_wait(key)


# --- message sizes for the comms logger (nccl-tests conventions, see utils/comms_logging.py) -----
# Each takes the wrapper's bound arguments (a dict by parameter name) and returns bytes.
def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _tensor_bytes(a) -> int:
    return _nbytes(a["tensor"])


def _whole_list_bytes(a) -> int:
    """gather/scatter: the tensor times the group size (the whole gathered or scattered list)."""
    return _nbytes(a["tensor"]) * get_world_size(a["group"])


# --- collectives (each one watched, and logged when the comms logger is on) -------------------
@logged("barrier", lambda a: 0)
def barrier(group=None, async_op: bool = False):
    if not is_initialized():
        return None
    return _watched("barrier", None, async_op, lambda: _dist.barrier(group=group, async_op=async_op))


@logged("all_reduce", _tensor_bytes)
def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None, async_op: bool = False):
    return _watched("all_reduce", tensor, async_op,
                    lambda: _dist.all_reduce(tensor, op=op, group=group, async_op=async_op))


@logged("reduce", _tensor_bytes)
def reduce(tensor: torch.Tensor, dst: int, op=ReduceOp.SUM, group=None, async_op: bool = False):
    return _watched("reduce", tensor, async_op,
                    lambda: _dist.reduce(tensor, dst, op=op, group=group, async_op=async_op))


@logged("broadcast", _tensor_bytes)
def broadcast(tensor: torch.Tensor, src: int, group=None, async_op: bool = False):
    return _watched("broadcast", tensor, async_op,
                    lambda: _dist.broadcast(tensor, src, group=group, async_op=async_op))


@logged("all_gather", lambda a: sum(_nbytes(t) for t in a["tensor_list"]))
def all_gather(tensor_list, tensor: torch.Tensor, group=None, async_op: bool = False):
    return _watched("all_gather", tensor, async_op,
                    lambda: _dist.all_gather(tensor_list, tensor, group=group, async_op=async_op))


# torch 2.13 renamed the tensor-in/tensor-out collectives (*_single) and deprecated the old
# names; use whichever this torch has so users see no deprecation warnings.
# Looked up by name at each call, so a wrapper installed on torch.distributed sees them too.
_ALL_GATHER_SINGLE = "all_gather_single" if hasattr(_dist, "all_gather_single") else "all_gather_into_tensor"
_REDUCE_SCATTER_SINGLE = "reduce_scatter_single" if hasattr(_dist, "reduce_scatter_single") else "reduce_scatter_tensor"


@logged("all_gather_into_tensor", lambda a: _nbytes(a["output_tensor"]))
def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op: bool = False):
    return _watched("all_gather_into_tensor", input_tensor, async_op,
                    lambda: getattr(_dist, _ALL_GATHER_SINGLE)(output_tensor, input_tensor, group=group, async_op=async_op))


@logged("reduce_scatter", lambda a: sum(_nbytes(t) for t in a["input_list"]))
def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op: bool = False):
    return _watched("reduce_scatter", output, async_op,
                    lambda: _dist.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op))


@logged("reduce_scatter_tensor", lambda a: _nbytes(a["input"]))
def reduce_scatter_tensor(output, input, op=ReduceOp.SUM, group=None, async_op: bool = False):
    return _watched("reduce_scatter_tensor", input, async_op,
                    lambda: getattr(_dist, _REDUCE_SCATTER_SINGLE)(output, input, op=op, group=group, async_op=async_op))


@logged("all_to_all_single", lambda a: _nbytes(a["input"]))
def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                      async_op: bool = False):
    return _watched("all_to_all_single", input, async_op,
                    lambda: _dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes,
                                                    group=group, async_op=async_op))


@logged("gather", _whole_list_bytes)
def gather(tensor, gather_list=None, dst: int = 0, group=None, async_op: bool = False):
    return _watched("gather", tensor, async_op,
                    lambda: _dist.gather(tensor, gather_list, dst=dst, group=group, async_op=async_op))


@logged("scatter", _whole_list_bytes)
def scatter(tensor, scatter_list=None, src: int = 0, group=None, async_op: bool = False):
    return _watched("scatter", tensor, async_op,
                    lambda: _dist.scatter(tensor, scatter_list, src=src, group=group, async_op=async_op))


@logged("send", _tensor_bytes)
def send(tensor, dst: int, group=None, tag: int = 0):
    return _watched(f"send to rank {dst}", tensor, False, lambda: _dist.send(tensor, dst, group=group, tag=tag))


@logged("recv", _tensor_bytes)
def recv(tensor, src=None, group=None, tag: int = 0):
    return _watched(f"recv from rank {src}", tensor, False, lambda: _dist.recv(tensor, src, group=group, tag=tag))


@logged("isend", _tensor_bytes)
def isend(tensor, dst: int, group=None, tag: int = 0):
    return _watched(f"isend to rank {dst}", tensor, True, lambda: _dist.isend(tensor, dst, group=group, tag=tag))


@logged("irecv", _tensor_bytes)
def irecv(tensor, src=None, group=None, tag: int = 0):
    return _watched(f"irecv from rank {src}", tensor, True, lambda: _dist.irecv(tensor, src, group=group, tag=tag))


def all_gather_object(object_list, obj, group=None):
    return _watched("all_gather_object", None, False, lambda: _dist.all_gather_object(object_list, obj, group=group))


def broadcast_object_list(object_list, src: int = 0, group=None):
    return _watched("broadcast_object_list", None, False,
                    lambda: _dist.broadcast_object_list(object_list, src=src, group=group))


def get_world_group():
    return _dist.group.WORLD
