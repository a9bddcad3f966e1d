"""``MoE``: DeepSpeed's mixture-of-experts layer (``deepspeed.moe.layer.MoE``), same signature and return.

Usage (as in DeepSpeed's CIFAR tutorial)::

    self.moe = MoE(hidden_size=84, expert=torch.nn.Linear(84, 84), num_experts=8, ep_size=2, k=2,
                   use_residual=True, drop_tokens=False)
    x, l_aux, exp_counts = self.moe(x)
    loss = task_loss + 0.01 * l_aux

``drop_tokens=False`` is the dropless mode we recommend: every token reaches its experts and the
experts run over variable token counts (``experts.py``); with ``drop_tokens=True`` (DeepSpeed's
default) the gate drops what exceeds ``capacity_factor``. ``ep_size`` ranks share the experts;
the expert process groups are created from the data-parallel group by the engine
(``deepscale.initialize``) or on the first forward.
"""
from typing import Optional, Tuple

import torch

from deepscale.comm.expert_groups import create_expert_groups, expert_group_name
from deepscale.moe.experts import Experts
from deepscale.moe.gating import TopKGate
from deepscale.moe.sharded_moe import MOELayer
from deepscale.utils.logging import logger

__all__ = ["MoE"]


class MoE(torch.nn.Module):
    """Mixture of experts with expert parallelism (Shazeer et al. 2017; GShard; DeepSpeed-MoE, Rajbhandari et al. 2022).

    Args:
        hidden_size: token dimension.
        expert: the expert module (copied ``num_experts / ep_size`` times on each rank).
        num_experts: total experts. Default 1.
        ep_size: expert-parallel degree; must divide ``num_experts`` and the data-parallel size. Default 1.
        k: experts per token (1, 2 or more). Default 1.
        capacity_factor, eval_capacity_factor: capacity multipliers (train/eval). Default 1.0.
        min_capacity: smallest capacity. Default 4.
        use_residual: PR-MoE (Rajbhandari et al. 2022): a dense copy of ``expert`` runs on every
            token and a learned 2-way softmax mixes it with the MoE output. Default False.
        noisy_gate_policy: None, 'Jitter' or 'RSample'. Default None.
        drop_tokens: False gives the dropless mode (no capacity). Default True (as DeepSpeed).
        use_rts: random token selection when top-1 capacity overflows. Default True.
        use_tutel: accepted; the dispatch never pads, so there is nothing for Tutel to remove. Default False.
        enable_expert_tensor_parallelism: must be False (experts are not tensor-parallel split here).
        top2_2nd_expert_sampling: Gumbel noise on the second top-2 choice in training. Default True.

    ``forward(hidden_states, used_token=None)`` returns ``(output, l_aux, exp_counts)``: the output
    shaped like the input, the load-balancing loss (add it to the loss with a small coefficient)
    and the assignments per expert before dropping (a CPU tensor).
    """

    def __init__(self, hidden_size: int, expert: torch.nn.Module, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True) -> None:
        super().__init__()
        if not isinstance(expert, torch.nn.Module):
            raise TypeError(f"MoE: expert must be an nn.Module, got {type(expert).__name__}")
        for name, value in (("num_experts", num_experts), ("ep_size", ep_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
        if num_experts % ep_size:
            raise ValueError(f"MoE: num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        if enable_expert_tensor_parallelism:
            raise ValueError("MoE: enable_expert_tensor_parallelism=True is not supported by deepscale; experts are "
                             "replicated whole on their expert-parallel rank (leave it False)")
        if use_tutel:
            logger.info("MoE: use_tutel=True has no effect; deepscale's dispatch moves only the routed tokens")
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.ep_size = ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.hidden_size = hidden_size
        gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling)
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts,
                                      use_tutel=use_tutel)
        if self.use_residual:
            self.mlp = expert
            self.coefficient = torch.nn.Linear(hidden_size, 2)
        self._groups_ready = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, dp_group=None) -> None:
        """Create (once per ``ep_size``) the expert process groups and give the layer its
        expert-parallel group; called by the engine, or on the first forward. Every rank must call it."""
        groups = create_expert_groups(self.ep_size, dp_group, data_before_expert=use_data_before_expert_parallel_)
        self.deepspeed_moe._set_ep_group(groups.ep_group)
        self.ep_rank = groups.ep_rank
        self._groups_ready = True

    def global_expert_index(self, local_index: int) -> int:
        """The index among all ``num_experts`` of local expert ``local_index`` on this rank."""
        return getattr(self, "ep_rank", 0) * self.num_local_experts + local_index

    def forward(self, hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(output, l_aux, exp_counts)`` (see the class docstring)."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: the input's last dimension is {hidden_states.shape[-1]} but hidden_size is "
                             f"{self.hidden_size}")
        if not self._groups_ready and self.ep_size > 1:
            self.set_deepspeed_parallelism()
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = torch.nn.functional.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
