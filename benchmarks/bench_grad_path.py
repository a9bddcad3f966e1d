"""A/B of the engine's gradient path (backward + step overhead) between deepscale checkouts.

Each sample is one process on one rank that trains an MLP whose gradients are large next to its
compute (so the cost of moving gradients shows), with gradient accumulation, and reports the
median time of one optimizer step (``gas`` forward/backward micro-steps and ``engine.step()``).
Checkouts are run alternately, round after round, so load on a shared machine hits them alike.

    python benchmarks/bench_grad_path.py --roots /tmp/base,. --stages 0 --rounds 5

Prints a table and, last, one JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(args) -> None:
    import torch
    import deepscale
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": args.gas,
           "train_batch_size": args.batch * args.gas, "steps_per_print": 10**9,
           "optimizer": {"type": "SGD", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": args.stage}}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(args.batch, args.width)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        for _ in range(args.gas):
            engine.backward(engine(x).square().mean())
            engine.step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_ms": 1000 * statistics.median(times[args.warmup:])}))


def _sample(root: str, stage: int, args) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--stage", str(stage)]
    for key in ("layers", "width", "batch", "gas", "steps", "warmup", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(cmd, env=env, cwd=os.path.abspath(root), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", default=".", help="comma-separated deepscale checkouts to compare")
    parser.add_argument("--stages", default="0", help="ZeRO stages, e.g. 0,1,2")
    parser.add_argument("--rounds", type=int, default=5, help="samples per checkout and stage, interleaved")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    roots = args.roots.split(",")
    stages = [int(s) for s in args.stages.split(",")]
    samples = {(root, stage): [] for root in roots for stage in stages}
    for _ in range(args.rounds):
        for stage in stages:
            for root in roots:
                samples[(root, stage)].append(_sample(root, stage, args))
    print(f"{'checkout':40s} stage  median ms  samples (ms)  [1-min load {os.getloadavg()[0]:.1f}]")
    rows = []
    for (root, stage), values in samples.items():
        median = statistics.median(values)
        print(f"{root:40s} {stage:5d}  {median:9.1f}  {' '.join(f'{v:.1f}' for v in values)}")
        rows.append({"root": root, "stage": stage, "median_ms": median, "samples_ms": values})
    print(json.dumps({"bench": "grad_path", "args": {k: v for k, v in vars(args).items() if k != "worker"},
                      "rows": rows}))


if __name__ == "__main__":
    main()
