"""Construction steps of the Engine, kept apart so the engine reads as a composition."""
from typing import Tuple

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from deepscale import comm as dist
from deepscale.comm.expert_groups import expert_groups_of_param
from deepscale.runtime.lr_schedules import build_lr_scheduler
from deepscale.runtime.optim.factory import build_optimizer
from deepscale.runtime.precision.loss_scaler import build_loss_scaler
from deepscale.utils.logging import logger

_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype_from_name(key: str, value):
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value
    name = str(value).lower()
    if name not in _DTYPE_NAMES:
        raise ValueError(f"{key}={value!r} is not a dtype; allowed: fp32, fp16, bf16")
    return _DTYPE_NAMES[name]


def build_optimizer_for(client_optimizer, config, model: torch.nn.Module, model_parameters):
    """The basic torch optimizer: the client's (instance or callable) wins over the config's."""
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    else:
        model_parameters = list(model_parameters)
    if client_optimizer is not None:
        if config.optimizer is not None:
            logger.warning("an optimizer was passed to initialize() and the config has an 'optimizer' section: "
                           "using the passed optimizer")
        if isinstance(client_optimizer, torch.optim.Optimizer):
            return client_optimizer
        if callable(client_optimizer):
            optimizer = client_optimizer(model_parameters)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"the optimizer callable passed to initialize() returned "
                                f"{type(optimizer).__name__}, not a torch.optim.Optimizer")
            return optimizer
        raise TypeError(f"initialize(optimizer=...) must be a torch.optim.Optimizer or a callable taking the "
                        f"model parameters, got {type(client_optimizer).__name__}")
    if config.optimizer is None:
        return None
    return build_optimizer(config.optimizer.type, dict(config.optimizer.params or {}), model_parameters)


def build_lr_scheduler_for(client_scheduler, config, basic_optimizer):
    """The lr schedule: the client's (instance or callable of the optimizer) wins over the config's."""
    if client_scheduler is not None:
        if config.scheduler is not None:
            logger.warning("an lr_scheduler was passed to initialize() and the config has a 'scheduler' section: "
                           "using the passed scheduler")
        if callable(client_scheduler) and not hasattr(client_scheduler, "step"):
            return client_scheduler(basic_optimizer)
        return client_scheduler
    if config.scheduler is None:
        return None
    if basic_optimizer is None:
        raise ValueError("the config has a 'scheduler' section but no optimizer was configured; add an "
                         "'optimizer' section or pass optimizer= to initialize()")
    return build_lr_scheduler(config.scheduler.type, dict(config.scheduler.params or {}), basic_optimizer)


def build_loss_scaler_for(config):
    """A loss scaler for fp16 (dynamic unless fp16.loss_scale > 0); None otherwise."""
    return build_loss_scaler(config.fp16) if config.fp16_enabled else None


# 25 MB of fp32 gradients per bucket, as PyTorch DDP: small enough that all but the last bucket
# are all-reduced while backward still runs.
STAGE0_DEFAULT_BUCKET_NUMEL = 25 * 2**20 // 4


def stage0_bucket_numel(config) -> int:
    """Elements per all-reduce bucket at stage 0.

    ``zero_optimization.reduce_bucket_size`` when the user set it; otherwise DDP's 25 MB.
    DeepSpeed's default (5e8 elements) would put most models in a single bucket launched
    after backward, leaving nothing to overlap.
    """
    user_zero = (getattr(config, "raw", None) or {}).get("zero_optimization") or {}
    if "reduce_bucket_size" in user_zero:
        return int(config.zero_optimization.reduce_bucket_size)
    return STAGE0_DEFAULT_BUCKET_NUMEL


def reducer_dtypes(config, model_dtype: torch.dtype) -> Tuple[torch.dtype, torch.dtype]:
    """(accumulation dtype, communication dtype) for the gradient reducer.

    Gradients accumulate in fp32 by default whatever the model dtype: bf16 sums lose
    precision quickly over micro-batches and ranks.
    """
    data_types = getattr(config, "data_types", None)
    accum = _dtype_from_name("data_types.grad_accum_dtype", getattr(data_types, "grad_accum_dtype", None))
    accum = accum or torch.float32
    comm = _dtype_from_name("communication_data_type", getattr(config, "communication_data_type", None))
    return accum, comm or accum


def setup_expert_parallelism(module: torch.nn.Module, dp_group, config=None) -> None:
    """Create the expert process groups of every MoE layer of ``module`` over the data-parallel
    group (collective: every rank builds the engine, so every rank gets here in the same order).
    ``use_data_before_expert_parallelism`` in the config picks the layout (``comm/expert_groups.py``)."""
    data_before = bool((getattr(config, "raw", None) or {}).get("use_data_before_expert_parallelism", False))
    for sub in module.modules():
        if hasattr(sub, "expert_group_name") and callable(getattr(sub, "set_deepspeed_parallelism", None)):
            sub.set_deepspeed_parallelism(data_before, dp_group=dp_group)


def _broadcast_tensors(tensors, src: int, group) -> None:
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for (_dtype, _device), group_tensors in by_dtype.items():
        flat = _flatten_dense_tensors([t.data for t in group_tensors])
        dist.broadcast(flat, src=src, group=group)
        for tensor, synced in zip(group_tensors, _unflatten_dense_tensors(flat, group_tensors)):
            tensor.data.copy_(synced)


@torch.no_grad()
def broadcast_module_from_rank0(module: torch.nn.Module, group, world_size: int) -> None:
    """Make every rank start from rank 0's parameters and buffers, one collective per dtype.

    Expert parameters (``allreduce=False``) differ between expert-parallel ranks: they are
    broadcast from the first rank of their expert-data-parallel group instead.
    """
    if world_size <= 1:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.numel() > 0]
    dense, experts = [], {}
    for tensor in tensors:
        groups = expert_groups_of_param(tensor)
        if groups is None:
            dense.append(tensor)
        else:
            experts.setdefault(groups.name, (groups, []))[1].append(tensor)
    _broadcast_tensors(dense, src, group)
    for name in sorted(experts):
        groups, members = experts[name]
        if groups.edp_size > 1:
            _broadcast_tensors(members, groups.edp_ranks[0], groups.edp_group)


def cast_floating_inputs(obj, dtype: torch.dtype):
    """Cast every floating-point tensor inside nested tuples/lists/dicts to ``dtype``."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(cast_floating_inputs(x, dtype) for x in obj)
    if isinstance(obj, list):
        return [cast_floating_inputs(x, dtype) for x in obj]
    if isinstance(obj, dict):
        return {k: cast_floating_inputs(v, dtype) for k, v in obj.items()}
    return obj


def configure_collective_watchdog(config) -> None:
    """Set up the process's collective watchdog from ``collective_watchdog`` (the ZeRO-3 key
    ``stage3_watchdog_timeout`` still sets the timeout when that section does not)."""
    section = config.collective_watchdog
    timeout = section.timeout
    zero = config.zero_optimization
    if "timeout" not in section.model_fields_set and "watchdog_timeout" in zero.model_fields_set:
        timeout = zero.watchdog_timeout
    dist.configure_watchdog(timeout_s=timeout, action=section.action)
