"""Top-1, top-2 and top-k gating with capacity, token dropping and random token selection.

Note: routing as indices, not dense masks. A gate decides, for each of ``S`` tokens and each of
its ``k`` slots, an expert, a combine weight and whether the assignment is kept. GShard-style
implementations (Lepikhin et al. 2020; DeepSpeed's ``sharded_moe``) encode this as dense
``[S, E, C]`` dispatch and combine tensors and move tokens with einsums, which costs
``O(S * E * C)`` memory and work. Here a gate returns a :class:`Routing` of ``[S, k]`` tensors
and the layer moves only the kept tokens (``sharded_moe.py``); :func:`top1gating`,
:func:`top2gating` and :func:`topkgating` still return DeepSpeed's dense tuple for callers that
want it. The decisions follow DeepSpeed's gates:

* top-1 (Switch, Fedus et al. 2021): expert ``argmax`` of the softmax (of the logits plus Gumbel
  noise with ``noisy_gate_policy='RSample'``); combine weight = its gate probability; capacity
  ``ceil(S / E * capacity_factor)`` (at least ``min_capacity``); over capacity, the tokens kept are
  a random choice with ``use_rts`` (random token selection) and the earliest ones otherwise.
  Auxiliary loss ``E * sum_e mean_s(gates[:, e]) * fraction_routed_to(e)``.
* top-2 (GShard): first expert ``argmax``, second the ``argmax`` of the rest (of the logits plus
  Gumbel noise with ``top2_2nd_expert_sampling``); capacity ``ceil(2 S / E * capacity_factor)``;
  first choices take capacity before second choices; weights renormalised over the kept pair.
  Auxiliary loss ``E^2 * mean_e(...)``.
* top-k: the ``k`` largest gates; capacity ``ceil(k S / E * capacity_factor)``; over capacity the
  assignments with the largest gates are kept; weights renormalised over the kept ones.

With ``drop_tokens=False`` nothing is dropped (the layer's dropless mode: experts see a variable
number of tokens). Noise (Jitter, RSample, second-expert sampling) applies in training only, so
evaluation is deterministic.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["Routing", "TopKGate", "top1gating", "top2gating", "topkgating", "gumbel_rsample", "multiplicative_jitter",
           "compute_capacity"]

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")


@dataclass
class Routing:
    """What a gate decided for ``S`` tokens with ``k`` slots each.

    Attributes: ``expert_idx`` (``[S, k]`` int64), ``weights`` (``[S, k]`` fp32 combine weights, 0
    where dropped), ``keep`` (``[S, k]`` bool), ``l_aux`` (load-balancing loss, 0-dim),
    ``exp_counts`` (``[E]`` int64 on CPU: assignments per expert before dropping), ``capacity``
    (int, or None without dropping), ``num_experts``.
    """
    expert_idx: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    l_aux: torch.Tensor
    exp_counts: torch.Tensor
    capacity: Optional[int]
    num_experts: int

    def to_dense(self):
        """DeepSpeed's ``(combine_weights [S, E, C], dispatch_mask [S, E, C])`` of this routing."""
        num_tokens, k = self.expert_idx.shape
        flat_e = self.expert_idx.reshape(-1)
        keep = self.keep.reshape(-1)
        capacity = self.capacity
        if capacity is None:
            capacity = max(1, int(torch.bincount(flat_e[keep], minlength=self.num_experts).max().item())) \
                if keep.any() else 1
        token = torch.arange(num_tokens, device=flat_e.device).repeat_interleave(k)
        sel = keep.nonzero().squeeze(1)
        kept_e = flat_e[sel]
        position = assign_positions(kept_e, torch.arange(sel.numel(), device=sel.device), self.num_experts)
        combine = self.weights.new_zeros(num_tokens, self.num_experts, capacity)
        combine[token[sel], kept_e, position] = self.weights.reshape(-1)[sel]
        return combine, combine.bool()


def gumbel_rsample(shape, device=None) -> torch.Tensor:
    """Samples of the standard Gumbel distribution (``-log(-log(U))``)."""
    uniform = torch.rand(shape, device=device).clamp_(min=1e-10, max=1 - 1e-7)
    return -torch.log(-torch.log(uniform))


def multiplicative_jitter(x: torch.Tensor, epsilon: float = 1e-2) -> torch.Tensor:
    """``x`` times noise uniform in ``[1 - epsilon, 1 + epsilon]`` (the 'Jitter' gate policy)."""
    if epsilon == 0:
        return x
    noise = torch.empty_like(x).uniform_(1.0 - epsilon, 1.0 + epsilon)
    return x * noise


def compute_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """Tokens each expert may take: ``ceil(k * num_tokens / num_experts * capacity_factor)``, at
    least ``min_capacity``."""
    return max(int(min_capacity), int(math.ceil(k * num_tokens / num_experts * capacity_factor)))


def assign_positions(flat_expert: torch.Tensor, priority: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each assignment among those of its expert, in ``priority`` order
    (a permutation of the assignment indices, first = highest priority)."""
    by_expert = torch.argsort(flat_expert[priority], stable=True)
    order = priority[by_expert]
    counts = torch.bincount(flat_expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    ranked = torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]
    position = torch.empty_like(ranked)
    position[order] = ranked
    return position


def _finish(gates, expert_idx, valid, priority, k, capacity_factor, min_capacity, drop_tokens, renormalize, l_aux):
    num_tokens, num_experts = gates.shape
    flat_e = expert_idx.reshape(-1)
    keep = valid.unsqueeze(1).expand_as(expert_idx).reshape(-1).clone()
    exp_counts = torch.bincount(flat_e[keep], minlength=num_experts).detach().to("cpu")
    capacity = None
    if drop_tokens:
        capacity = compute_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity)
        keep &= assign_positions(flat_e, priority, num_experts) < capacity
    keep = keep.view(num_tokens, k)
    weights = gates.gather(1, expert_idx) * keep
    if renormalize:
        denom = weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
        weights = weights / denom
    return Routing(expert_idx, weights, keep, l_aux, exp_counts, capacity, num_experts)


def _valid(used_token, num_tokens, device):
    if used_token is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return used_token.reshape(-1).to(device) != 0


def route_top1(logits: torch.Tensor, capacity_factor: float, min_capacity: int, used_token=None,
               noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True) -> Routing:
    """Top-1 routing of ``[S, E]`` fp32 logits (see the module Note)."""
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)
    scores = logits + gumbel_rsample(logits.shape, logits.device) if noisy_gate_policy == "RSample" else gates
    expert_idx = torch.argmax(scores, dim=1, keepdim=True)
    valid = _valid(used_token, num_tokens, logits.device)
    mask = F.one_hot(expert_idx[:, 0], num_experts).to(gates.dtype) * valid.unsqueeze(1)
    l_aux = torch.sum(gates.mean(dim=0) * mask.mean(dim=0)) * num_experts
    if use_rts:
        priority = torch.randperm(num_tokens, device=logits.device)
    else:
        priority = torch.arange(num_tokens, device=logits.device)
    return _finish(gates, expert_idx, valid, priority, 1, capacity_factor, min_capacity, drop_tokens, False, l_aux)


def route_top2(logits: torch.Tensor, capacity_factor: float, min_capacity: int, used_token=None,
               drop_tokens: bool = True, second_expert_sampling: bool = True) -> Routing:
    """Top-2 routing of ``[S, E]`` fp32 logits (see the module Note)."""
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)
    first = torch.argmax(gates, dim=1)
    scores = logits + gumbel_rsample(logits.shape, logits.device) if second_expert_sampling else logits
    second = torch.argmax(scores.scatter(1, first.unsqueeze(1), float("-inf")), dim=1)
    expert_idx = torch.stack([first, second], dim=1)
    valid = _valid(used_token, num_tokens, logits.device)
    mask1 = F.one_hot(first, num_experts).to(gates.dtype) * valid.unsqueeze(1)
    l_aux = torch.mean(gates.mean(dim=0) * mask1.mean(dim=0)) * num_experts * num_experts
    # first choices (in token order) take capacity before second choices: slot-major priority
    flat = torch.arange(num_tokens * 2, device=logits.device)
    priority = (flat % num_tokens) * 2 + flat // num_tokens
    return _finish(gates, expert_idx, valid, priority, 2, capacity_factor, min_capacity, drop_tokens, True, l_aux)


def route_topk(logits: torch.Tensor, k: int, capacity_factor: float, min_capacity: int, used_token=None,
               drop_tokens: bool = True) -> Routing:
    """Top-k routing of ``[S, E]`` fp32 logits (see the module Note)."""
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be between 1 and num_experts={num_experts}")
    gates = F.softmax(logits, dim=1)
    top_gates, expert_idx = torch.topk(gates, k, dim=1)
    valid = _valid(used_token, num_tokens, logits.device)
    mask = torch.zeros_like(gates).scatter_(1, expert_idx, 1.0) * valid.unsqueeze(1)
    l_aux = torch.mean(gates.mean(dim=0) * mask.mean(dim=0)) * num_experts * num_experts / k
    priority = torch.argsort(top_gates.detach().reshape(-1), descending=True, stable=True)
    return _finish(gates, expert_idx, valid, priority, k, capacity_factor, min_capacity, drop_tokens, True, l_aux)


def _dense(routing: Routing):
    combine, dispatch = routing.to_dense()
    return routing.l_aux, combine, dispatch, routing.exp_counts


def top1gating(logits, capacity_factor, min_capacity, used_token=None, noisy_gate_policy=None, drop_tokens=True,
               use_rts=True, ep_group=None, use_tutel=False):
    """DeepSpeed's ``top1gating``: ``(l_aux, combine_weights, dispatch_mask, exp_counts)``, dense ``[S, E, C]``."""
    return _dense(route_top1(logits.float(), capacity_factor, min_capacity, used_token, noisy_gate_policy,
                             drop_tokens, use_rts))


def top2gating(logits, capacity_factor, min_capacity, drop_tokens=True, ep_group=None, top2_2nd_expert_sampling=True):
    """DeepSpeed's ``top2gating``: ``(l_aux, combine_weights, dispatch_mask, exp_counts)``, dense ``[S, E, C]``."""
    return _dense(route_top2(logits.float(), capacity_factor, min_capacity, None, drop_tokens,
                             top2_2nd_expert_sampling))


def topkgating(logits, k, capacity_factor, min_capacity, drop_tokens=True, ep_group=None, drop_policy="probs"):
    """DeepSpeed's ``topkgating``: ``(l_aux, combine_weights, dispatch_mask, exp_counts)``, dense ``[S, E, C]``."""
    return _dense(route_topk(logits.float(), k, capacity_factor, min_capacity, None, drop_tokens))


class TopKGate(torch.nn.Module):
    """The router: a bias-free linear map to one logit per expert, then top-k gating.

    Args:
        model_dim: hidden size of the tokens.
        num_experts: total experts (over all expert-parallel ranks).
        k: experts per token. Default 1.
        capacity_factor, eval_capacity_factor: capacity multipliers in training / evaluation. Default 1.0.
        min_capacity: smallest capacity. Default 8.
        noisy_gate_policy: None, 'Jitter' (multiplicative input noise) or 'RSample' (Gumbel noise on
            the top-1 choice). Default None.
        drop_tokens: drop assignments over capacity; False routes every token (dropless). Default True.
        use_rts: random token selection for top-1 over capacity. Default True.
        ep_group: accepted for DeepSpeed compatibility (the layer owns the group). Default None.
        top2_2nd_expert_sampling: Gumbel noise on the second choice of top-2. Default True.
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, ep_group=None, top2_2nd_expert_sampling: bool = True):
        super().__init__()
        if noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(f"noisy_gate_policy must be one of {NOISY_GATE_POLICIES}, got {noisy_gate_policy!r}")
        if not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int between 1 and num_experts={num_experts}, got {k!r}")
        if noisy_gate_policy == "RSample" and k != 1:
            raise ValueError("noisy_gate_policy='RSample' applies to top-1 gating only (k=1); use "
                             "top2_2nd_expert_sampling for top-2")
        self.wg = torch.nn.Linear(model_dim, num_experts, bias=False).float()
        self.k, self.num_experts = k, num_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens, self.use_rts = drop_tokens, use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.ep_group = ep_group

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, input: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                use_tutel: bool = False) -> Routing:
        """Route ``[S, model_dim]`` tokens; returns a :class:`Routing`."""
        x = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = multiplicative_jitter(x)
        logits = F.linear(x, self.wg.weight.float())
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            return route_top1(logits, factor, self.min_capacity, used_token,
                              self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts)
        if self.k == 2:
            return route_top2(logits, factor, self.min_capacity, used_token, self.drop_tokens,
                              self.top2_2nd_expert_sampling and self.training)
        return route_topk(logits, self.k, factor, self.min_capacity, used_token, self.drop_tokens)
