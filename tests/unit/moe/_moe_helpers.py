"""Shared pieces of the MoE tests: a naive reference of what an MoE layer computes."""
import torch


def distinct_experts(moe, seed: int = 0) -> None:
    """Give every local expert its own random weights (copies start identical)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moe.deepspeed_moe.experts.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def naive_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over kept slots of weight * expert(token), using the routing the layer
    just produced (``moe.deepspeed_moe.last_routing``)."""
    routing = moe.deepspeed_moe.last_routing
    experts = moe.deepspeed_moe.experts.deepspeed_experts
    tokens = x.reshape(-1, x.shape[-1])
    rows = []
    for s in range(tokens.shape[0]):
        acc = torch.zeros(tokens.shape[-1])
        for j in range(routing.expert_idx.shape[1]):
            if routing.keep[s, j]:
                acc = acc + routing.weights[s, j] * experts[int(routing.expert_idx[s, j])](tokens[s:s + 1])[0]
        rows.append(acc)
    return torch.stack(rows).reshape(x.shape)
