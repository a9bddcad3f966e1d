"""Gradients of mixture-of-experts models: which group reduces them, and their global norm.

Note: expert gradients. An expert parameter (``allreduce=False``) is held by the ranks of its
expert-data-parallel group only; the all-to-all backward already summed, on its owner, the
gradient contributions of every token routed to it from the expert-parallel peers. Reducing it
over the expert-data-parallel group therefore sums over every data-parallel rank, and dividing
by the *whole* data-parallel size (not the expert-data-parallel size) gives the same average a
dense parameter gets (DeepSpeed issue 5618 was expert gradients scaled by the smaller group).
For the global gradient norm, dense gradients count once and expert gradients once per expert:
the squared norms of the expert parts are summed over the expert-parallel group.
"""
from typing import Dict, List, Sequence, Tuple

import torch

from deepscale import comm as dist
from deepscale.comm.expert_groups import ExpertGroups, expert_groups_of_param
from deepscale.runtime.grad_reducer import GradientReducer
from deepscale.runtime.precision.precision_optimizer import squared_norm


def split_by_expert_group(params: Sequence[torch.Tensor]) -> Tuple[List, List[Tuple[ExpertGroups, List]]]:
    """``(dense, [(expert groups, params), ...])``, the expert parts sorted by group name, order kept."""
    dense, experts = [], {}
    for param in params:
        groups = expert_groups_of_param(param)
        if groups is None:
            dense.append(param)
        else:
            experts.setdefault(groups.name, (groups, []))[1].append(param)
    return dense, [experts[name] for name in sorted(experts)]


def expert_squared_norms(parts: Sequence[Tuple[ExpertGroups, List[torch.Tensor]]]) -> torch.Tensor:
    """Sum over the expert-parallel group of the squared norms of each part (float64, 0-dim)."""
    total = torch.zeros((), dtype=torch.float64)
    for groups, tensors in parts:
        squares = squared_norm(tensors)
        if groups.ep_size > 1:
            dist.all_reduce(squares, group=groups.ep_group)
        total = total + squares
    return total


class GradientReducerSet:
    """One :class:`GradientReducer` for the dense parameters (over the data-parallel group) and one
    per expert group (over its expert-data-parallel group, averaged over the data-parallel size),
    with the reducer interface the stage-0 optimizer uses."""

    def __init__(self, params: Sequence[torch.nn.Parameter], group, world_size: int, **reducer_args):
        dense, experts = split_by_expert_group([p for p in params if p.requires_grad])
        self.dense = GradientReducer(dense, group=group, world_size=world_size, **reducer_args)
        self.experts = [(groups, GradientReducer(members, group=groups.edp_group, world_size=groups.edp_size,
                                                 average_world_size=world_size, **reducer_args))
                        for groups, members in experts]
        self.parts = [self.dense] + [reducer for _, reducer in self.experts]
        self.params = [p for part in self.parts for p in part.params]
        self._owner: Dict[torch.nn.Parameter, GradientReducer] = {p: part for part in self.parts for p in part.params}

    def grad_view(self, param):
        return self._owner[param].grad_view(param)

    @property
    def buffers(self) -> List[torch.Tensor]:
        return [part.buffer for part in self.parts]

    def begin_backward(self, sync: bool) -> None:
        for part in self.parts:
            part.begin_backward(sync)

    def end_backward(self, sync: bool) -> None:
        for part in self.parts:
            part.end_backward(sync)

    def abort_backward(self) -> None:
        for part in self.parts:
            part.abort_backward()

    @property
    def has_pending_grads(self) -> bool:
        return any(part.has_pending_grads for part in self.parts)

    @property
    def foreign_after_sync(self) -> bool:
        return any(part.foreign_after_sync for part in self.parts)

    def squared_norm(self) -> torch.Tensor:
        """Squared global norm of the averaged gradients (every rank gets the same value)."""
        return squared_norm([self.dense.buffer]) + expert_squared_norms(
            [(groups, [reducer.buffer]) for groups, reducer in self.experts])

    def zero(self) -> None:
        for part in self.parts:
            part.zero()

    def remove_hooks(self) -> None:
        for part in self.parts:
            part.remove_hooks()

    def release(self) -> None:
        for part in self.parts:
            part.buffer = torch.empty(0)
