"""Expert parallelism for Hugging Face ``transformers`` MoE models (Mixtral, Qwen2-MoE, ...).

In transformers 5.x a sparse MoE block routes with its own router (``block.gate``) and runs its
experts as one module holding fused weights (``block.experts``: ``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, ``act_fn``; ``forward(hidden_states, top_k_index, top_k_weights)``).
Such a model already trains under ZeRO-3 without leaf-module lists (the experts module runs on
every step). :func:`convert_hf_moe_experts` goes further: it replaces every such experts module by
:class:`ExpertParallelHFExperts`, which keeps the model's router, its routing decisions and its
parameter count but spreads the experts over ``ep_size`` ranks with deepscale's dispatch
(``sharded_moe.py``), so ZeRO partitions them over the expert-data-parallel group and checkpoints
save them per expert. The rest of the model (router, shared experts, router-logit outputs) is
untouched.
"""
import torch

from deepscale.comm.expert_groups import create_expert_groups, expert_group_name
from deepscale.moe.experts import Experts
from deepscale.moe.gating import Routing
from deepscale.moe.sharded_moe import MOELayer

__all__ = ["SwiGLUExpert", "ExpertParallelHFExperts", "convert_hf_moe_experts"]


class SwiGLUExpert(torch.nn.Module):
    """One gated MLP expert: ``down(act(gate(x)) * up(x))`` with ``gate`` and ``up`` fused in
    ``gate_up_proj`` (the layout transformers' fused experts use)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class ExpertParallelHFExperts(torch.nn.Module):
    """Drop-in replacement of a transformers fused experts module, experts split over ``ep_size`` ranks.

    Args:
        fused: the module to replace (``gate_up_proj``, ``down_proj``, ``act_fn``).
        ep_size: expert-parallel degree (divides the number of experts and the data-parallel size).
        dp_group: the data-parallel group the expert groups are made from. Default: the world.
    """

    def __init__(self, fused: torch.nn.Module, ep_size: int = 1, dp_group=None):
        super().__init__()
        gate_up, down = fused.gate_up_proj, fused.down_proj
        num_experts, hidden = gate_up.shape[0], gate_up.shape[2]
        intermediate = gate_up.shape[1] // 2
        if num_experts % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide the number of experts ({num_experts})")
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        template = SwiGLUExpert(hidden, intermediate, fused.act_fn).to(dtype=gate_up.dtype, device=gate_up.device)
        experts = Experts(template, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(None, experts, self.expert_group_name, ep_size, self.num_local_experts)
        self.set_deepspeed_parallelism(dp_group=dp_group)
        with torch.no_grad():
            for local, expert in enumerate(experts.deepspeed_experts):
                index = self.global_expert_index(local)
                expert.gate_up_proj.weight.copy_(gate_up[index])
                expert.down_proj.weight.copy_(down[index])

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, dp_group=None) -> None:
        """Create (once) the expert process groups and take this rank's expert-parallel group."""
        groups = create_expert_groups(self.ep_size, dp_group, data_before_expert=use_data_before_expert_parallel_)
        self.deepspeed_moe._set_ep_group(groups.ep_group)
        self.ep_rank = groups.ep_rank

    def global_expert_index(self, local_index: int) -> int:
        return self.ep_rank * self.num_local_experts + local_index

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(top_k_index, dtype=torch.bool)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts).cpu()
        routing = Routing(top_k_index, top_k_weights, keep, hidden_states.new_zeros(()), counts, None,
                          self.num_experts)
        return self.deepspeed_moe.dispatch(hidden_states, routing).to(hidden_states.dtype)


def _is_fused_experts(module: torch.nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn"))


def convert_hf_moe_experts(model: torch.nn.Module, ep_size: int = 1, dp_group=None) -> int:
    """Replace every fused experts module of ``model`` (an attribute named ``experts`` with 3-D
    ``gate_up_proj``/``down_proj``) by :class:`ExpertParallelHFExperts`; returns how many.

    Call it after ``deepscale.init_distributed()`` and before ``deepscale.initialize``; every rank
    must call it (it creates the expert process groups). Raises ``ValueError`` when the model has
    no such module.
    """
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if name == "experts" and _is_fused_experts(child)]
    if not targets:
        raise ValueError("convert_hf_moe_experts: the model has no fused experts module (an 'experts' child with "
                         "3-D gate_up_proj and down_proj parameters, as transformers 5.x MoE models have)")
    for parent, name in targets:
        setattr(parent, name, ExpertParallelHFExperts(getattr(parent, name), ep_size, dp_group))
    return len(targets)

