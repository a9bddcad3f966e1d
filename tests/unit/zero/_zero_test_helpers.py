"""Shared pieces of the ZeRO tests: engine construction, a training loop and a plain reference."""
import torch

from engine_test_models import make_model, rank_micro_batch, global_batch

MICRO_BS = 2
LR, WD = 1e-2, 0.01
BIAS_LR = 5e-3


def param_groups(model, two_groups: bool):
    """One group, or weights (lr 1e-2, wd 0.01) and biases (lr 5e-3, no decay)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not two_groups:
        return [{"params": [p for _, p in trainable]}]
    return [{"params": [p for n, p in trainable if n.endswith("weight")]},
            {"params": [p for n, p in trainable if n.endswith("bias")], "lr": BIAS_LR, "weight_decay": 0.0}]


def zero_config(stage: int, world: int, gas: int = 1, clip: float = 0.0, micro_bs: int = MICRO_BS, **zero_extra):
    cfg = {
        "train_batch_size": micro_bs * gas * world,
        "train_micro_batch_size_per_gpu": micro_bs,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.99]}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, "allgather_bucket_size": 500,
                              **zero_extra},
    }
    # Explicit even when 0: the references do not clip, and DeepSpeed's default is 1.0.
    cfg["gradient_clipping"] = clip
    return cfg


def build_engine(stage: int, world: int, gas: int = 1, clip: float = 0.0, two_groups: bool = False,
                 model_kwargs=None, seed: int = 1234, extra_cfg=None, micro_bs: int = MICRO_BS, **zero_extra):
    import deepscale
    model = make_model(seed=seed, **(model_kwargs or {}))
    cfg = zero_config(stage, world, gas, clip, micro_bs, **zero_extra)
    cfg.update(extra_cfg or {})
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=param_groups(model, two_groups), config=cfg)
    return engine


def train(engine, world: int, steps, gas: int = 1, unused_alternate: bool = False, micro_bs: int = MICRO_BS):
    """Train over ``steps``; returns the per-step mean loss over all ranks and micro-batches."""
    import torch.distributed as dist
    rank, losses = dist.get_rank(), []
    for step in steps:
        step_loss = torch.zeros(())
        for micro in range(gas):
            x, y = rank_micro_batch(step, micro, rank, micro_bs, gas, world)
            loss = engine(x, y, use_extra=unused_alternate and step % 2 == 0)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / gas
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
    return losses


def module_params(engine):
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def reference(num_steps: int, batch_size: int, clip: float = 0.0, two_groups: bool = False,
              unused_alternate: bool = False, model_kwargs=None):
    """Plain single-process PyTorch over the same global batches; returns (losses, params)."""
    model = make_model(**(model_kwargs or {}))
    groups = param_groups(model, two_groups)
    for group in groups:
        group.setdefault("lr", LR)
        group.setdefault("weight_decay", WD)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99))
    losses = []
    for step in range(num_steps):
        x, y = global_batch(step, batch_size)
        loss = model(x, y, use_extra=unused_alternate and step % 2 == 0)
        loss.backward()
        for param in model.parameters():  # data parallelism averages zeros for unused parameters
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def rank_micro_batch_for(step: int, world: int, micro_bs: int = MICRO_BS):
    """This rank's micro-batch of ``step`` (no accumulation)."""
    import torch.distributed as dist
    return rank_micro_batch(step, 0, dist.get_rank(), micro_bs, 1, world)
