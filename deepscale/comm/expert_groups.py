"""Expert-parallel and expert-data-parallel process groups, built from the parallel topology.

Note: how the data-parallel ranks are split. A mixture-of-experts layer with ``ep_size`` spreads
its experts over ``ep_size`` ranks; the data-parallel group of ``N`` ranks is laid out as a
:class:`~deepscale.comm.topology.ParallelTopology` with ``dp = N / ep_size`` and ``ep = ep_size``
(``ep`` varies fastest, so the ranks of an expert-parallel group are neighbours). The ranks along
the ``ep`` axis form an *expert-parallel* group (they exchange tokens with all-to-all and hold
different experts); the ranks along the ``dp`` axis, at one ``ep`` coordinate, form an
*expert-data-parallel* group (they hold the same experts, so expert gradients are reduced and
expert optimizer states partitioned over it). For ranks ``0..3`` and ``ep_size=2``: expert-parallel
``[0, 1], [2, 3]``, expert-data-parallel ``[0, 2], [1, 3]`` (DeepSpeed's layout too). With
``data_before_expert`` (DeepSpeed's ``use_data_before_expert_parallelism``) the roles swap: the
expert-data-parallel ranks are neighbours (``[0, 1], [2, 3]``) and the expert-parallel ones
strided (``[0, 2], [1, 3]``).

Groups are registered under a name (``"ep_size_{ep_size}"``, the name DeepSpeed's MoE layer
puts on its expert parameters as ``param.group_name``), so ZeRO finds the group of a parameter
from its name without importing the MoE package. ``torch.distributed.new_group`` is collective
over the whole job: :func:`create_expert_groups` must be called by every rank in the same order.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from deepscale.comm.topology import ParallelTopology

__all__ = ["ExpertGroups", "create_expert_groups", "get_expert_groups", "expert_group_name",
           "expert_groups_of_param", "clear_expert_groups", "registered_expert_groups"]

_REGISTRY: Dict[str, "ExpertGroups"] = {}


@dataclass
class ExpertGroups:
    """The groups of one expert-parallel degree, from this rank's point of view.

    ``None`` as a group means "no communication needed" only when its size is 1; a group of
    the whole default world is stored as the group object torch returned.
    """
    name: str
    ep_size: int
    edp_size: int
    ep_rank: int
    edp_rank: int
    ep_group: object
    edp_group: object
    dp_world_size: int
    ep_ranks: List[int]
    edp_ranks: List[int]
    distributed: bool = True  # False: made before torch.distributed was initialized
    world: object = None  # the default group the groups were made in (a new one makes them stale)
    data_before_expert: bool = False


def expert_group_name(ep_size: int) -> str:
    """The registry name of the groups of ``ep_size`` (what expert parameters carry as ``group_name``)."""
    return f"ep_size_{int(ep_size)}"


def _single_process(name: str, ep_size: int) -> ExpertGroups:
    if ep_size != 1:
        raise ValueError(f"ep_size={ep_size} needs torch.distributed initialized with at least {ep_size} ranks "
                         "(call deepscale.init_distributed() first)")
    return ExpertGroups(name, 1, 1, 0, 0, None, None, 1, [0], [0], distributed=False)


def create_expert_groups(ep_size: int, dp_group=None, data_before_expert: bool = False) -> ExpertGroups:
    """Create (once) and return the expert groups of ``ep_size`` over the data-parallel group.

    Args:
        ep_size: expert-parallel degree; must divide the data-parallel world size.
        dp_group: the data-parallel process group this rank belongs to (None: the whole world).
            With tensor or pipeline parallelism every rank passes its own data-parallel group;
            all such groups are split the same way.
        data_before_expert: lay expert-data-parallel ranks out as neighbours instead of the
            expert-parallel ones (``use_data_before_expert_parallelism``). Default False.
    """
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    name = expert_group_name(ep_size)
    from deepscale import comm as dist
    cached = _REGISTRY.get(name)
    if cached is not None and cached.data_before_expert != bool(data_before_expert) and not _stale(cached):
        raise ValueError(f"expert groups of ep_size={ep_size} already exist with use_data_before_expert_parallelism="
                         f"{cached.data_before_expert}; one job uses one layout")
    # A group set made before torch.distributed was initialized is the single-process one: rebuild it.
    if cached is not None and not _stale(cached):
        return cached
    if not dist.is_initialized():
        groups = _single_process(name, ep_size)
        _REGISTRY[name] = groups
        return groups
    import torch.distributed as torch_dist
    mine = tuple(torch_dist.get_process_group_ranks(dp_group)) if dp_group is not None else tuple(
        range(dist.get_world_size()))
    if len(mine) % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the data-parallel world size {len(mine)}")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    rank = dist.get_rank()
    result = None
    # Every rank creates every group in the same order (new_group is collective over the job).
    for dp_ranks in sorted({tuple(r) for r in everyone}):
        if data_before_expert:  # the fast axis holds the expert-data-parallel peers
            topo = ParallelTopology(dp=ep_size, ep=len(dp_ranks) // ep_size)
            roles = {"ep": "dp", "dp": "ep"}
        else:
            topo = ParallelTopology(dp=len(dp_ranks) // ep_size, ep=ep_size)
            roles = {"ep": "ep", "dp": "dp"}
        created = {}
        for axis in ("ep", "dp"):
            for local in topo.axis_groups(axis):
                ranks = [dp_ranks[i] for i in local]
                group = dist.new_group(ranks=ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    created[roles[axis]] = (group, ranks)
        if rank in dp_ranks:
            (ep_group, ep_ranks), (edp_group, edp_ranks) = created["ep"], created["dp"]
            result = ExpertGroups(name, ep_size, len(edp_ranks), ep_ranks.index(rank), edp_ranks.index(rank),
                                  ep_group, edp_group, len(dp_ranks), ep_ranks, edp_ranks,
                                  world=dist.get_world_group(), data_before_expert=bool(data_before_expert))
    assert result is not None, "this rank is in no data-parallel group"
    _REGISTRY[name] = result
    return result


def _stale(groups: ExpertGroups) -> bool:
    from deepscale import comm as dist
    if not dist.is_initialized():
        return groups.distributed
    if not groups.distributed or groups.world is not dist.get_world_group():
        return True
    import torch.distributed as torch_dist
    for group in (groups.ep_group, groups.edp_group):
        if group is not None:
            try:  # a destroyed group is no longer known to torch
                torch_dist.get_process_group_ranks(group)
            except (ValueError, RuntimeError, KeyError):
                return True
    return False


def get_expert_groups(name: str) -> ExpertGroups:
    """The groups registered under ``name`` (``"ep_size_{N}"``)."""
    if name not in _REGISTRY or _stale(_REGISTRY[name]):
        raise ValueError(f"no expert process groups named {name!r}; they are created when the engine is built "
                         f"(or by MoE.set_deepspeed_parallelism()); known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def expert_groups_of_param(param: torch.Tensor) -> Optional[ExpertGroups]:
    """The expert groups of an expert parameter (``allreduce=False``), None for a dense one."""
    if getattr(param, "allreduce", True) is not False:
        return None
    return get_expert_groups(str(getattr(param, "group_name", expert_group_name(1))))


def registered_expert_groups() -> List[ExpertGroups]:
    """Every live group set created so far, sorted by name."""
    return [g for name, g in sorted(_REGISTRY.items()) if not _stale(g)]


def clear_expert_groups() -> None:
    """Forget every registered group (after ``destroy_process_group``, or between tests)."""
    _REGISTRY.clear()
