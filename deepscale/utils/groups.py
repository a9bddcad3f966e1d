"""Process-group accessors under DeepSpeed's names (``deepspeed.utils.groups``).

DeepSpeed clients (Accelerate, Megatron-style code) ask this module for the data-parallel,
model-parallel and sequence-parallel groups. The answers come from the model-parallel unit when
one is registered (``groups.mpu = mpu``, which ``deepscale.initialize(mpu=...)`` also does) and
otherwise from ``deepscale.comm``: without an mpu every rank is a data-parallel peer and the
model- and sequence-parallel degrees are 1. A group deepscale has not built (a sequence-parallel
group with degree > 1, tensor-parallel groups without an mpu) raises ``ValueError`` saying so.

Imports ``deepscale.comm`` lazily: ``deepscale.utils`` stays importable without torch.
"""
mpu = None  # a Megatron-style model-parallel unit, set by the user or by initialize(mpu=...)

__all__ = ["mpu", "_get_data_parallel_group", "_get_data_parallel_world_size", "_get_data_parallel_rank",
           "_get_model_parallel_group", "_get_model_parallel_world_size", "_get_model_parallel_rank",
           "_get_sequence_parallel_group", "_get_sequence_parallel_world_size", "_get_sequence_parallel_rank",
           "_get_sequence_data_parallel_group", "_get_sequence_data_parallel_world_size",
           "_get_sequence_data_parallel_rank", "_get_world_size", "_get_broadcast_src_rank",
           "_create_expert_and_data_parallel", "_get_expert_parallel_group", "_get_expert_data_parallel_group",
           "_get_expert_parallel_world_size", "_get_expert_data_parallel_world_size", "_get_expert_parallel_rank",
           "_get_expert_data_parallel_rank", "_get_expert_parallel_group_dict",
           "_get_expert_data_parallel_group_dict", "_get_max_expert_size", "_get_max_expert_size_name"]


def _comm():
    from deepscale import comm
    if not comm.is_initialized():
        raise ValueError("deepscale.utils.groups: torch.distributed is not initialised; call "
                         "deepscale.init_distributed() (or deepscale.initialize) first")
    return comm


def _mpu_call(name: str):
    method = getattr(mpu, name, None) if mpu is not None else None
    return method() if callable(method) else None


def _get_world_size() -> int:
    """Number of ranks in the job."""
    return _comm().get_world_size()


def _get_data_parallel_group():
    """The data-parallel process group: the mpu's, else the world group."""
    group = _mpu_call("get_data_parallel_group")
    return group if group is not None else _comm().get_world_group()


def _get_data_parallel_world_size() -> int:
    """Number of data-parallel ranks."""
    size = _mpu_call("get_data_parallel_world_size")
    return size if size is not None else _comm().get_world_size(_get_data_parallel_group())


def _get_data_parallel_rank() -> int:
    """This rank's index in the data-parallel group."""
    rank = _mpu_call("get_data_parallel_rank")
    return rank if rank is not None else _comm().get_rank(_get_data_parallel_group())


def _get_broadcast_src_rank() -> int:
    """Global rank of the first member of this rank's data-parallel group."""
    return _comm().get_global_rank(_get_data_parallel_group(), 0)


def _get_model_parallel_group():
    """The model(tensor)-parallel group; only an mpu defines one."""
    group = _mpu_call("get_model_parallel_group") or _mpu_call("get_tensor_model_parallel_group")
    if group is None:
        raise ValueError("deepscale.utils.groups: no model-parallel group: register a model-parallel unit "
                         "(groups.mpu = mpu or deepscale.initialize(mpu=...)); without one the degree is 1")
    return group


def _get_model_parallel_world_size() -> int:
    """Model-parallel degree (1 without an mpu)."""
    size = _mpu_call("get_model_parallel_world_size") or _mpu_call("get_tensor_model_parallel_world_size")
    return size if size is not None else 1


def _get_model_parallel_rank() -> int:
    """This rank's index in the model-parallel group (0 without an mpu)."""
    rank = _mpu_call("get_model_parallel_rank")
    if rank is None:
        rank = _mpu_call("get_tensor_model_parallel_rank")
    return rank if rank is not None else 0


def _get_sequence_parallel_world_size() -> int:
    """Sequence-parallel degree (1 unless the mpu defines sequence parallelism)."""
    size = _mpu_call("get_sequence_parallel_world_size")
    return size if size is not None else 1


def _get_sequence_parallel_rank() -> int:
    """This rank's index in the sequence-parallel group (0 without sequence parallelism)."""
    rank = _mpu_call("get_sequence_parallel_rank")
    return rank if rank is not None else 0


def _get_sequence_parallel_group():
    """The sequence-parallel group; only an mpu with sequence parallelism defines one."""
    group = _mpu_call("get_sequence_parallel_group")
    if group is None:
        raise ValueError("deepscale.utils.groups: no sequence-parallel group: sequence parallelism is not "
                         "configured (its degree is 1); Ulysses sequence parallelism needs an mpu that defines it")
    return group


def _get_sequence_data_parallel_group():
    """The group spanning sequence- and data-parallel ranks (the data-parallel group when sp is 1)."""
    group = _mpu_call("get_sequence_data_parallel_group")
    return group if group is not None else _get_data_parallel_group()


def _get_sequence_data_parallel_world_size() -> int:
    size = _mpu_call("get_sequence_data_parallel_world_size")
    return size if size is not None else _get_data_parallel_world_size() * _get_sequence_parallel_world_size()


def _get_sequence_data_parallel_rank() -> int:
    rank = _mpu_call("get_sequence_data_parallel_rank")
    return rank if rank is not None else _comm().get_rank(_get_sequence_data_parallel_group())


# --- mixture-of-experts groups (deepscale/comm/expert_groups.py) -------------------------------
def _expert_groups(group_name: str):
    from deepscale.comm.expert_groups import get_expert_groups
    return get_expert_groups(group_name)


def _create_expert_and_data_parallel(expert_parallel_size_: int, use_data_before_expert_parallel_: bool = False):
    """Create the expert-parallel and expert-data-parallel groups of ``expert_parallel_size_`` over the
    data-parallel group (every rank must call it; the engine does for each MoE layer)."""
    from deepscale.comm.expert_groups import create_expert_groups
    _comm()
    dp_group = _mpu_call("get_data_parallel_group")
    create_expert_groups(expert_parallel_size_, dp_group, data_before_expert=use_data_before_expert_parallel_)


def _get_expert_parallel_group(group_name: str):
    """The expert-parallel group registered as ``group_name`` (``"ep_size_{N}"``)."""
    return _expert_groups(group_name).ep_group


def _get_expert_data_parallel_group(group_name: str):
    """The expert-data-parallel group registered as ``group_name``."""
    return _expert_groups(group_name).edp_group


def _get_expert_parallel_world_size(group_name: str) -> int:
    return _expert_groups(group_name).ep_size


def _get_expert_data_parallel_world_size(group_name: str) -> int:
    return _expert_groups(group_name).edp_size


def _get_expert_parallel_rank(group_name: str) -> int:
    return _expert_groups(group_name).ep_rank


def _get_expert_data_parallel_rank(group_name: str) -> int:
    return _expert_groups(group_name).edp_rank


def _get_expert_parallel_group_dict() -> dict:
    """``group name -> expert-parallel group`` of every expert group set created so far."""
    from deepscale.comm.expert_groups import registered_expert_groups
    return {g.name: g.ep_group for g in registered_expert_groups()}


def _get_expert_data_parallel_group_dict() -> dict:
    """``group name -> expert-data-parallel group`` of every expert group set created so far."""
    from deepscale.comm.expert_groups import registered_expert_groups
    return {g.name: g.edp_group for g in registered_expert_groups()}


def _get_max_expert_size() -> int:
    """The largest expert-parallel degree created so far (1 when none)."""
    from deepscale.comm.expert_groups import registered_expert_groups
    return max([g.ep_size for g in registered_expert_groups()] or [1])


def _get_max_expert_size_name() -> str:
    return f"ep_size_{_get_max_expert_size()}"
