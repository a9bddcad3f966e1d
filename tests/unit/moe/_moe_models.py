"""A small MoE model and its single-process reference for the distributed MoE tests."""
import torch

import deepscale
from deepscale.moe.layer import MoE
from deepscale.moe.utils import split_params_into_different_moe_groups_for_optimizer

HIDDEN, FFN, NUM_EXPERTS, MICRO_BS = 8, 16, 4, 6
AUX_COEF = 0.01


class MoENet(torch.nn.Module):
    def __init__(self, ep_size=1, k=2, drop_tokens=False, capacity_factor=8.0, use_residual=False):
        super().__init__()
        self.inp = torch.nn.Linear(HIDDEN, HIDDEN)
        expert = torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, HIDDEN))
        self.moe = MoE(HIDDEN, expert, num_experts=NUM_EXPERTS, ep_size=ep_size, k=k, drop_tokens=drop_tokens,
                       capacity_factor=capacity_factor, min_capacity=1, use_rts=False,
                       top2_2nd_expert_sampling=False, use_residual=use_residual)
        self.out = torch.nn.Linear(HIDDEN, 3)

    def forward(self, x, y):
        h, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
        return torch.nn.functional.mse_loss(self.out(h), y) + AUX_COEF * l_aux


def reference_state(seed=0, **kwargs):
    """The full (EP=1) model's state with distinct random experts."""
    torch.manual_seed(seed)
    model = MoENet(**kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.moe.deepspeed_moe.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.moe.deepspeed_moe.gate.wg.weight.mul_(4.0)  # a decisive router
    return model.state_dict()


def local_state(full_state, ep_size, ep_rank):
    """The part of ``full_state`` an EP rank holds, with local expert indices."""
    num_local = NUM_EXPERTS // ep_size
    out = {}
    marker = "deepspeed_experts."
    for name, value in full_state.items():
        if marker in name:
            head, tail = name.split(marker)
            index, rest = tail.split(".", 1)
            index = int(index) - ep_rank * num_local
            if 0 <= index < num_local:
                out[f"{head}{marker}{index}.{rest}"] = value
        else:
            out[name] = value
    return out


def batch(step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO_BS, HIDDEN, generator=gen), torch.randn(MICRO_BS, 3, generator=gen)


def reference_run(num_steps, world, lr=0.1, **kwargs):
    """Single process, all experts: per step, the mean over ranks of each rank's loss, SGD."""
    model = MoENet(**kwargs)
    model.load_state_dict(reference_state(**kwargs))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(num_steps):
        per_rank = [model(*batch(step, r)) for r in range(world)]
        total = sum(per_rank) / world
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append([float(v) for v in per_rank])
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def build_engine(stage, ep_size, lr=0.1, optimizer="SGD", moe_groups=False, bucket=200, extra_config=None, **kwargs):
    import torch.distributed as dist
    model = MoENet(ep_size=ep_size, **kwargs)
    data_before = (extra_config or {}).get("use_data_before_expert_parallelism", False)
    ep_rank = dist.get_rank() // (dist.get_world_size() // ep_size) if data_before else dist.get_rank() % ep_size
    model.load_state_dict(local_state(reference_state(**kwargs), ep_size, ep_rank))
    params = model.parameters()
    if moe_groups:
        params = split_params_into_different_moe_groups_for_optimizer({"params": list(params), "name": "all"})
    config = {"train_micro_batch_size_per_gpu": MICRO_BS, "gradient_clipping": 0.0,
              "optimizer": {"type": optimizer, "params": {"lr": lr}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket}, **(extra_config or {})}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=params, config=config)
    return engine
