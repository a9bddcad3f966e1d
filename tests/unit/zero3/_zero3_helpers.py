"""Engine construction, a training loop and a single-process reference for the ZeRO-3 tests."""
import torch

from _zero3_models import gpt_global_batch, gpt_rank_batch, make_gpt

MICRO_BS = 2
LR, WD = 1e-2, 0.01
# Small thresholds so a tiny model still has many groups, persistent parameters and prefetch.
STAGE3_SMALL = {"reduce_bucket_size": 600, "stage3_param_persistence_threshold": 20,
                "stage3_prefetch_bucket_size": 600, "stage3_max_live_parameters": 3000,
                "stage3_max_reuse_distance": 500}


def gpt_config(stage: int, world: int, gas: int = 1, clip: float = 0.0, **zero_extra) -> dict:
    cfg = {
        "train_batch_size": MICRO_BS * gas * world,
        "train_micro_batch_size_per_gpu": MICRO_BS,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.99]}},
        "zero_optimization": {"stage": stage, **(zero_extra if stage == 3 else {})},
    }
    # Explicit even when 0: the references do not clip, and DeepSpeed's default is 1.0.
    cfg["gradient_clipping"] = clip
    return cfg


def build_gpt_engine(stage: int, world: int, gas: int = 1, clip: float = 0.0, model_kwargs=None, model=None,
                     extra_cfg=None, **zero_extra):
    import deepscale
    model = model if model is not None else make_gpt(**(model_kwargs or {}))
    cfg = gpt_config(stage, world, gas, clip, **zero_extra)
    cfg.update(extra_cfg or {})
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def train_gpt(engine, world: int, steps, gas: int = 1):
    """Train; returns the per-step mean loss over ranks and micro-batches."""
    import torch.distributed as dist
    rank, losses = dist.get_rank(), []
    for step in steps:
        step_loss = torch.zeros(())
        for micro in range(gas):
            idx, tgt = gpt_rank_batch(step, micro, rank, MICRO_BS, gas, world)
            loss = engine(idx, tgt)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / gas
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
    return losses


def full_params(engine):
    """Whole fp32 copies of the module's parameters (gathers under ZeRO-3)."""
    import deepscale.zero
    with deepscale.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def gpt_reference(num_steps: int, batch_size: int, clip: float = 0.0, model_kwargs=None):
    """Plain single-process PyTorch on the same global batches; returns (losses, params)."""
    model = make_gpt(**(model_kwargs or {}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD,
                            betas=(0.9, 0.99))
    losses = []
    for step in range(num_steps):
        idx, tgt = gpt_global_batch(step, batch_size)
        loss = model(idx, tgt)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def trim_heap() -> None:
    """Return freed heap pages to the OS so resident memory measures live data only."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
