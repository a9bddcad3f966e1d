"""MoE layer forward+backward on CPU: deepscale (dropless grouped matmul, dropless per-expert
loop, capacity) against DeepSpeed's ``MoE`` layer, interleaved in the same run.

DeepSpeed runs in a worker process of another interpreter (``--ds-python``, a virtualenv with
``deepspeed`` installed; default ``/work/venv-ds/bin/python``) that takes commands on stdin, so
both libraries are timed round by round on the same machine state. Each measurement is the
median CPU time (one thread) over ``--iters`` forward+backward passes of ``--tokens`` tokens;
rounds alternate the implementations and the reported figure is the median over rounds.

    python benchmarks/bench_moe.py --tokens 2048 --hidden 256 --ffn 512 --experts 8 --k 2

Prints a table and a JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO_ROOT, format_table, free_port, median  # noqa: E402


def _build(lib: str, args, drop_tokens: bool, grouped=None):
    import torch
    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(args.hidden, args.ffn), torch.nn.GELU(),
                                 torch.nn.Linear(args.ffn, args.hidden))
    if lib == "deepspeed":
        from deepspeed.moe.layer import MoE
    else:
        from deepscale.moe.layer import MoE
    layer = MoE(args.hidden, expert, num_experts=args.experts, ep_size=1, k=args.k, capacity_factor=1.0,
                drop_tokens=drop_tokens)
    if lib == "deepspeed":
        layer.set_deepspeed_parallelism()
    else:
        layer.deepspeed_moe.experts.use_grouped_mm = grouped
    return layer


def _time(layer, args) -> float:
    """Median CPU seconds of one forward+backward. CPU time (one thread), not wall time: on a
    shared machine the wall time of a pass mostly measures how long it waited for a core."""
    import torch
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    times = []
    for i in range(args.iters + 1):
        start = time.process_time()
        out, l_aux, _ = layer(x)
        (out.float().pow(2).mean() + l_aux).backward()
        if i:  # the first pass warms up
            times.append(time.process_time() - start)
    return median(times)


def worker(args) -> None:
    """DeepSpeed side: build its layers once, then answer 'time <name>' lines with seconds."""
    import torch
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    layers = {"deepspeed capacity 1.0": _build("deepspeed", args, True),
              "deepspeed drop_tokens=False": _build("deepspeed", args, False)}
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        print(json.dumps({"name": name, "seconds": _time(layers[name], args)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ds-python", default="/work/venv-ds/bin/python")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO_ROOT))
    ours = {"deepscale dropless grouped_mm": _build("deepscale", args, False, grouped=True),
            "deepscale dropless per-expert loop": _build("deepscale", args, False, grouped=False),
            "deepscale capacity 1.0": _build("deepscale", args, True, grouped=None)}
    ds = None
    if os.path.exists(args.ds_python):
        argv = [args.ds_python, __file__, "--worker", "--port", str(free_port())] + [
            f"--{k}={v}" for k, v in (("tokens", args.tokens), ("hidden", args.hidden), ("ffn", args.ffn),
                                      ("experts", args.experts), ("k", args.k), ("iters", args.iters),
                                      ("threads", args.threads))]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        ds = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env)
        while ds.stdout.readline().strip() != "ready":
            if ds.poll() is not None:
                raise RuntimeError(f"the DeepSpeed worker ({args.ds_python}) exited with {ds.returncode}")
    results = {}
    ds_names = ["deepspeed capacity 1.0", "deepspeed drop_tokens=False"] if ds else []
    for _ in range(args.rounds):
        for name, layer in ours.items():
            results.setdefault(name, []).append(_time(layer, args))
        for name in ds_names:
            ds.stdin.write(name + "\n")
            ds.stdin.flush()
            results.setdefault(name, []).append(json.loads(ds.stdout.readline())["seconds"])
    if ds:
        ds.stdin.write("\n")
        ds.stdin.flush()
        ds.wait(timeout=60)
    base = median(results["deepspeed capacity 1.0"]) if ds else None
    rows, summary = [], {}
    for name, values in results.items():
        ms = 1000 * median(values)  # CPU time
        summary[name] = round(ms, 2)
        rows.append([name, f"{ms:.1f}", f"{base * 1000 / ms:.2f}x" if base else "-"])
    print(f"MoE fwd+bwd, {args.tokens} tokens, hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, "
          f"top-{args.k}, {args.threads} thread(s), median of {args.rounds} rounds x {args.iters} iters")
    print(format_table(["implementation", "CPU ms", "speed-up vs DeepSpeed capacity"], rows))
    print(json.dumps({"bench": "moe_layer", "tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn,
                      "experts": args.experts, "k": args.k, "threads": args.threads, "ms": summary}))


if __name__ == "__main__":
    main()
