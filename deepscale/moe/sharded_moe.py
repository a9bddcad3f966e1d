"""The expert-parallel MoE layer: route, dispatch, run the local experts, combine.

Note: dispatch without padding. Only kept assignments travel. They are sorted by global expert;
experts ``[r * L, (r + 1) * L)`` live on rank ``r`` of the expert-parallel group (``L`` local
experts), so the sorted rows are already grouped by destination rank. One all-to-all of the
per-expert counts tells every rank how many rows it receives from each peer for each of its
experts; one all-to-all with uneven splits moves the rows; they are regrouped from
(source rank, expert) order to (expert, source rank) order and each local expert runs on its
rows (``experts.py``). The results go back by the reverse path and are summed into the token
outputs weighted by the gate. With capacity (``drop_tokens=True``) the gate drops what exceeds
it and the rest travels the same way, so a capacity-based layer computes exactly what the
dense ``[S, E, C]`` einsum formulation computes, without its zeros.
Every rank issues the same three collectives per forward (and per backward) whatever the
routing, including when it sends or receives no rows at all.
"""
from typing import Optional

import torch

from deepscale.moe.all_to_all import all_to_all_rows, exchange_counts
from deepscale.moe.experts import Experts
from deepscale.moe.gating import TopKGate, top1gating, top2gating, topkgating  # noqa: F401 (DeepSpeed names)

__all__ = ["MOELayer", "TopKGate", "top1gating", "top2gating", "topkgating"]


def _expert_major_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """Row permutation from (source rank, local expert) blocks to (local expert, source rank)."""
    world, num_local = recv_counts.shape
    blocks = torch.arange(world * num_local, device=recv_counts.device)
    block_of_row = torch.repeat_interleave(blocks, recv_counts.reshape(-1))
    key = (block_of_row % num_local) * world + block_of_row // num_local
    return torch.argsort(key, stable=True)


class MOELayer(torch.nn.Module):
    """Gate + experts + token exchange (DeepSpeed's ``MOELayer``).

    Args:
        gate: the router (:class:`TopKGate`); None when the caller routes itself and calls
            :meth:`dispatch` (``hf.py``).
        experts: the local experts (:class:`Experts`).
        ep_group_name: registry name of the expert process groups.
        ep_size: expert-parallel degree.
        num_local_experts: experts on this rank.
        use_tutel: accepted for DeepSpeed compatibility; the dispatch above already moves only
            the routed tokens.
    """

    def __init__(self, gate: TopKGate, experts: Experts, ep_group_name: str, ep_size: int, num_local_experts: int,
                 use_tutel: bool = False):
        super().__init__()
        self.gate, self.experts = gate, experts
        self.ep_group_name, self.ep_size, self.num_local_experts = ep_group_name, ep_size, num_local_experts
        self.ep_group = None
        self.use_tutel = use_tutel
        self.l_aux: Optional[torch.Tensor] = None
        self.exp_counts: Optional[torch.Tensor] = None
        self.last_routing = None  # the gate's decisions of the last forward (a Routing)

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group
        if self.gate is not None:
            self.gate._set_ep_group(ep_group)

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        model_dim = hidden_states.shape[-1]
        tokens = hidden_states.reshape(-1, model_dim)
        routing = self.gate(tokens, used_token)
        self.l_aux, self.exp_counts = routing.l_aux, routing.exp_counts
        self.last_routing = routing
        out = self.dispatch(tokens, routing)
        return out.reshape(hidden_states.shape[:-1] + (out.shape[-1],))

    def dispatch(self, tokens: torch.Tensor, routing) -> torch.Tensor:
        """Run the kept assignments of ``routing`` through the experts (on whichever rank holds
        them) and return the ``[S, out]`` gate-weighted sums; ``tokens`` is ``[S, model_dim]``."""
        num_tokens, k = routing.expert_idx.shape
        flat_expert = routing.expert_idx.reshape(-1)
        kept = routing.keep.reshape(-1).nonzero().squeeze(1)
        kept = kept[torch.argsort(flat_expert[kept], stable=True)]
        token_of = kept // k
        counts = torch.bincount(flat_expert[kept], minlength=routing.num_experts)
        rows = tokens.index_select(0, token_of)  # backward: index_add (index's backward sorts)
        expert_out = self._run_experts(rows, counts)
        weights = routing.weights.reshape(-1)[kept].to(expert_out.dtype).unsqueeze(1)
        out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
        return out.index_add(0, token_of, expert_out * weights)

    def _run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return self.experts(rows, counts.tolist())
        send_counts = counts.view(self.ep_size, self.num_local_experts)
        recv_counts = exchange_counts(send_counts, self.ep_group, self.ep_size)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all_rows(rows, send_splits, recv_splits, self.ep_group, self.ep_size)
        order = _expert_major_order(recv_counts)
        expert_out = self.experts(received[order], recv_counts.sum(0).tolist())
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all_rows(expert_out[back], recv_splits, send_splits, self.ep_group, self.ep_size)

