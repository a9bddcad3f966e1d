"""The engine's optimizer step with the compiled CPU Adam vs torch's fused AdamW, paired A/B.

One process (world size 1, gloo) builds two engines on the same GPT and config, one with the
config path's choice (deepscale's compiled ``DeepScaleCPUAdam``) and one with ``"torch_adam":
true`` (``torch.optim.AdamW``, fused), and alternates them step by step in a shuffled order, so
both see the same machine load. For each engine it times ``engine.step()`` (clipping, the
optimizer update, zeroing the gradients) and the whole ``forward + backward + step``, and
reports medians and the median of the per-round ratios torch / compiled (above 1: compiled
faster).

    python benchmarks/bench_engine_optimizer.py --rounds 30
"""
import argparse
import json
import os
import random
import sys
import time

from _bench_common import REPO_ROOT, format_table, free_port, load_module, median

sys.path.insert(0, str(REPO_ROOT))


def _config(torch_adam: bool, stage: int) -> dict:
    params = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if torch_adam:
        params["torch_adam"] = True
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": params},
            "zero_optimization": {"stage": stage}}


def _engine(args, torch_adam, torch):
    import deepscale
    gpt = load_module(REPO_ROOT / "examples/gpt/model.py", "bench_gpt_model")
    torch.manual_seed(1234)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=args.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer,
                                  n_head=args.n_head, d_model=args.d_model))
    return deepscale.initialize(model=model, config=_config(torch_adam, args.stage))[0]


def _timed_step(engine, batch):
    start = time.perf_counter()
    loss = engine(batch)
    engine.backward(loss)
    mid = time.perf_counter()
    engine.step()
    end = time.perf_counter()
    return end - start, end - mid


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=256)
    args = parser.parse_args(argv)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), OMP_NUM_THREADS=str(args.threads))
    import torch
    import deepscale
    torch.set_num_threads(args.threads)
    deepscale.init_distributed()
    engines = {"compiled": _engine(args, False, torch), "torch": _engine(args, True, torch)}
    kinds = {name: type(e.basic_optimizer).__name__ for name, e in engines.items()}
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, args.vocab_size, (4, args.seq_len), generator=gen),
             torch.randint(0, args.vocab_size, (4, args.seq_len), generator=gen))
    times = {name: {"total": [], "step": []} for name in engines}
    order = random.Random(0)
    load_before = os.getloadavg()[0]
    for round_index in range(args.warmup + args.rounds):
        names = list(engines)
        order.shuffle(names)
        for name in names:
            total, step = _timed_step(engines[name], batch)
            if round_index >= args.warmup:
                times[name]["total"].append(total)
                times[name]["step"].append(step)
    load_after = os.getloadavg()[0]
    ratios = {key: median([t / c for t, c in zip(times["torch"][key], times["compiled"][key])])
              for key in ("total", "step")}
    rows = [[name, kinds[name], f"{1e3 * median(t['step']):.1f}", f"{1e3 * median(t['total']):.1f}"]
            for name, t in times.items()]
    print(f"load average {load_before:.1f} before, {load_after:.1f} after; {args.rounds} rounds, "
          f"{args.threads} thread(s), ZeRO stage {args.stage}")
    print(format_table(["engine", "optimizer", "engine.step() ms", "fwd+bwd+step ms"], rows))
    print(f"median per-round ratio torch/compiled: engine.step() {ratios['step']:.3f}, "
          f"fwd+bwd+step {ratios['total']:.3f}")
    summary = {"bench": "engine_optimizer", "kinds": kinds, "ratios_torch_over_compiled": ratios,
               "median_ms": {n: {k: 1e3 * median(v) for k, v in t.items()} for n, t in times.items()},
               "rounds": args.rounds, "threads": args.threads, "stage": args.stage,
               "load_before": load_before, "load_after": load_after}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
