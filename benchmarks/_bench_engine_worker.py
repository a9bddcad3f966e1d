"""One rank of benchmarks/bench_engine.py: train the GPT for a few steps and write figures.

Started by bench_engine.py with the torch.distributed environment variables set and the run's
settings as JSON in ``BENCH_SPEC``. Writes ``<out_dir>/rank<RANK>.json``. Every framework gets
the same model (same seed), the same batches and the same AdamW hyper-parameters; only the
code between "model built" and "train step" differs.
"""
import time

_T_FIRST_LINE = time.time()  # before any heavy import: fallback for the process start time

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402

T_START = min(common.process_start_time(), _T_FIRST_LINE)


def main() -> None:
    spec = json.loads(os.environ["BENCH_SPEC"])
    rank = int(os.environ["RANK"])
    out = Path(spec["out_dir"]) / f"rank{rank}.json"
    import torch
    torch.set_num_threads(spec["threads"])
    try:
        setup = _import_framework(spec["framework"])
    except (ImportError, AttributeError) as err:  # report a missing framework as a skip
        out.write_text(json.dumps({"skipped": f"{spec['framework']} unavailable: {err}"}))
        return
    t_import = time.time()
    result = run(spec, setup, torch)
    result.update(import_s=t_import - T_START, rank=rank, torch=torch.__version__)
    out.write_text(json.dumps(result))


def _import_framework(name: str):
    """Import the framework now (its import time is part of start-up) and return its set-up."""
    if name == "ddp":
        import torch.distributed  # noqa: F401
        return setup_ddp
    if name in ("deepscale", "deepscale_torch_adam"):
        import deepscale
        deepscale.initialize  # noqa: B018  raises AttributeError until the engine exists
        return setup_deepscale
    if name == "deepspeed":
        import deepspeed  # noqa: F401
        return setup_deepspeed
    if name == "fsdp2":
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        return setup_fsdp2
    raise ValueError(f"framework must be one of ddp, deepscale, deepscale_torch_adam, deepspeed, fsdp2; "
                     f"got {name!r}")


def build_model_and_batches(spec, torch):
    """The GPT (seeded identically on every rank) and this rank's batches, one per step."""
    gpt = common.load_module(common.REPO_ROOT / "examples/gpt/model.py", "bench_gpt_model")
    data = common.load_module(common.REPO_ROOT / "examples/gpt/data.py", "bench_gpt_data")
    m = spec["model"]
    torch.manual_seed(spec["seed"])
    model = gpt.GPT(gpt.GPTConfig(n_layer=m["n_layer"], n_head=m["n_head"], d_model=m["d_model"],
                                  vocab_size=m["vocab_size"], seq_len=m["seq_len"]))
    rank, world, mb = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), spec["micro_batch"]
    dataset = data.MarkovChainDataset(num_samples=spec["steps"] * world * mb, seq_len=m["seq_len"],
                                      vocab_size=m["vocab_size"], seed=spec["data_seed"])
    batches = []
    for step in range(spec["steps"]):
        first = (step * world + rank) * mb  # rank r of step s reads its own disjoint slice
        rows = dataset.tokens[first:first + mb]
        batches.append({"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()})
    return model, batches


def ds_config(spec, framework: str) -> dict:
    """The DeepSpeed-format config both engines get (DeepSpeed also gets ``torch_adam``)."""
    opt = spec["optim"]
    params = {"lr": opt["lr"], "betas": opt["betas"], "eps": opt["eps"],
              "weight_decay": opt["weight_decay"]}
    offload = spec.get("offload", "none")
    if framework in ("deepspeed", "deepscale_torch_adam") and offload == "none":
        params["torch_adam"] = True  # torch.optim.AdamW, as in DDP, instead of a compiled Adam
    cfg = {"train_micro_batch_size_per_gpu": spec["micro_batch"],
           "gradient_accumulation_steps": 1,
           "gradient_clipping": opt["clip"],
           "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": params},
           "zero_optimization": {"stage": spec["stage"]}}
    if offload != "none":  # bench_offload.py: both engines step with their compiled CPU Adam
        section = {"device": offload}
        if offload == "nvme":
            section["nvme_path"] = spec["nvme_path"]
        cfg["zero_optimization"]["offload_optimizer"] = section
    if spec["dtype"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def setup_ddp(spec, model, torch):
    """Plain PyTorch: DDP + torch.optim.AdamW; bf16 means autocast with fp32 weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo")
    ddp = DistributedDataParallel(model)
    opt = spec["optim"]
    optimizer = _adamw(ddp.parameters(), opt, torch)
    return _plain_step(ddp, optimizer, opt["clip"], torch, autocast_bf16=spec["dtype"] == "bf16")


def _adamw(params, opt, torch):
    """torch.optim.AdamW with the run's hyper-parameters (what DDP and FSDP2 rows train with)."""
    return torch.optim.AdamW(params, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                             weight_decay=opt["weight_decay"])


def _plain_step(module, optimizer, clip, torch, autocast_bf16=False):
    """A plain PyTorch training step: forward (optionally under bf16 autocast), backward,
    clip by the global norm, optimizer step, gradients to None."""
    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = module(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def _engine_step(engine):
    def step(batch):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        return loss
    return step


def setup_deepscale(spec, model, torch):
    """deepscale.initialize with the DeepSpeed-format config."""
    import deepscale
    deepscale.init_distributed()
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(spec, spec["framework"]))
    return _engine_step(engine)


def setup_deepspeed(spec, model, torch):
    """deepspeed.initialize on the CPU accelerator with gloo."""
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(spec, "deepspeed"))
    return _engine_step(engine)


def setup_fsdp2(spec, model, torch):
    """PyTorch FSDP2: ``fully_shard`` per block and on the root, torch.optim.AdamW on the shards;
    bf16 means bf16 parameters in compute with fp32 shards and fp32 gradient reduction."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if spec["dtype"] == "bf16" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = spec["optim"]
    optimizer = _adamw(model.parameters(), opt, torch)
    return _plain_step(model, optimizer, opt["clip"], torch)


def run(spec, setup, torch) -> dict:
    """Build, set up, train ``spec['steps']`` steps; return this rank's measurements."""
    import torch.distributed as dist
    model, batches = build_model_and_batches(spec, torch)
    num_params = sum(p.numel() for p in model.parameters())  # before any engine shards them
    t_call = time.time()
    step = setup(spec, model, torch)
    t_ready = time.time()
    losses, step_s = [], []
    for batch in batches:
        t0 = time.perf_counter()
        losses.append(step(batch).detach().float().reshape(1))
        step_s.append(time.perf_counter() - t0)
        if len(step_s) == 1:
            t_first = time.time()
        print(f"step {len(step_s)}/{len(batches)} {step_s[-1]:.3f}s", flush=True)  # progress
    # Average the per-step losses over ranks once, after timing, to keep the loop clean.
    loss_t = torch.cat(losses).double()
    dist.all_reduce(loss_t)
    timed = step_s[spec["warmup"]:]
    return {"init_s": t_ready - T_START, "init_call_s": t_ready - t_call,
            "first_step_s": t_first - T_START, "step_s_median": common.median(timed),
            "step_s_min": min(timed), "step_s": step_s,
            "losses": (loss_t / dist.get_world_size()).tolist(),
            "peak_rss_mib": common.peak_rss_mib(), "threads": torch.get_num_threads(),
            "num_params": num_params}


if __name__ == "__main__":
    main()
