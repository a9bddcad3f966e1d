"""CPU Adam throughput: deepscale's DeepScaleCPUAdam against torch.optim.Adam (for-loop,
foreach, fused) and DeepSpeed's DeepSpeedCPUAdam (when importable), interleaved in one run.

    python benchmarks/bench_cpu_adam.py [--sizes 10M,100M,300M] [--threads 1,2] [--reps 5]

For every size (1 tensor and 100 tensors) and thread count, each contender does one step in
turn (the order rotates every round), `reps` rounds after a warm-up round; the table shows the
median. All contenders share one set of parameters, gradients and moments (timing does not
depend on the values, and it keeps 300M parameters within memory). The copy-out rows time the
ZeRO-Offload case: fp32 master step plus a bf16 copy of the new parameters; deepscale does
both in one pass (30 bytes per parameter moved instead of 28 + 6). The triad row is the machine's streaming bandwidth
(a = b + s*c), the floor for a memory-bound update. Prints a table and one JSON line.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepscale.ops.adam import DeepScaleCPUAdam  # noqa: E402

BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v (fp32)


def parse_size(text):
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMG" else text) * scale)


def make_buffers(total, count):
    """Parameters (with grads) and moments as `count` tensors adding up to `total` elements."""
    sizes = [total // count + (1 if i < total % count else 0) for i in range(count)]
    params, moments = [], []
    for n in sizes:
        p = torch.empty(n).uniform_(-1, 1)
        p.grad = torch.empty(n).uniform_(-1, 1)
        params.append(p)
        moments.append((torch.zeros(n), torch.zeros(n)))
    return params, moments


def deepspeed_adam():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam
    except Exception:  # not installed, or its op cannot build here
        return None


def contenders(params, moments, threads, copy_out=None, skip_slow=False):
    """name -> step callable, every optimizer wired to the shared moments."""
    runs = {}
    ours = DeepScaleCPUAdam(params, lr=1e-3, num_threads=threads)
    for p, (m, v) in zip(params, moments):
        ours.state[p] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
    if copy_out is None:
        runs["deepscale"] = ours.step
    else:
        runs["deepscale (1 pass)"] = lambda: ours.step(fp16_param_groups=[copy_out])
    variants = {"torch for-loop": dict(foreach=False), "torch foreach": dict(foreach=True), "torch fused": dict(fused=True)}
    if skip_slow:
        variants = {"torch fused": dict(fused=True)}
    for name, kwargs in variants.items():
        if copy_out is not None and name != "torch fused":
            continue
        opt = torch.optim.Adam(params, lr=1e-3, **kwargs)
        for p, (m, v) in zip(params, moments):
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": m, "exp_avg_sq": v}
        runs[name] = opt.step if copy_out is None else _with_copy(opt.step, params, copy_out)
    ds_cls = deepspeed_adam()
    if ds_cls is not None:
        ds = ds_cls(params, lr=1e-3)
        for p, (m, v) in zip(params, moments):
            ds.state[p] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
        runs["deepspeed"] = ds.step if copy_out is None else _with_copy(ds.step, params, copy_out)
    return runs


def _with_copy(step, params, outs):
    def run():
        step()
        for p, o in zip(params, outs):
            o.copy_(p)
    return run


def interleaved(runs, reps):
    # The order rotates every round, so no contender always runs first or always follows the
    # same one (whose dirty cache lines and busy threads it would inherit).
    times = {name: [] for name in runs}
    order = list(runs.items())
    for round_index in range(reps + 1):
        shift = round_index % len(order)
        for name, fn in order[shift:] + order[:shift]:
            start = time.perf_counter()
            fn()
            if round_index:  # round 0 warms caches and lazy state
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def triad_bandwidth(threads, numel=50_000_000, reps=5):
    a, b, c = torch.empty(numel), torch.rand(numel), torch.rand(numel)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.add(b, c, alpha=0.5, out=a)
        best = min(best, time.perf_counter() - start)
    return 12 * numel / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,100M,300M")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tensors", default="1,100")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-slow", action="store_true",
                        help="leave out torch's for-loop and foreach Adam (10x slower, most of the run time)")
    args = parser.parse_args()
    rows, triad = [], {}
    print(f"{'params':>8} {'tensors':>7} {'thr':>3} {'contender':<20} {'ms/step':>9} {'Gparam/s':>9} {'GB/s':>7}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        triad[threads] = triad_bandwidth(threads)
        print(f"{'triad':>8} {'':>7} {threads:>3} {'a = b + s*c':<20} {'':>9} {'':>9} {triad[threads]:>7.1f}")
        for size_text in args.sizes.split(","):
            total = parse_size(size_text)
            for count in [int(c) for c in args.tensors.split(",")]:
                params, moments = make_buffers(total, count)
                cases = [(None, BYTES_PER_PARAM)]
                if count == 1:
                    cases.append(([torch.empty(p.numel(), dtype=torch.bfloat16) for p in params], None))
                for copy_out, _ in cases:
                    runs = contenders(params, moments, threads, copy_out, args.skip_slow)
                    medians = interleaved(runs, args.reps)
                    for name, seconds in medians.items():
                        moved = BYTES_PER_PARAM + (0 if copy_out is None else (2 if "1 pass" in name else 6))
                        row = dict(params=total, tensors=count, threads=threads, contender=name,
                                   copy_out=copy_out is not None, ms=seconds * 1e3,
                                   gparams_per_s=total / seconds / 1e9, gb_per_s=total * moved / seconds / 1e9)
                        rows.append(row)
                        label = name + (" +copy" if copy_out is not None and "1 pass" not in name else "")
                        print(f"{size_text:>8} {count:>7} {threads:>3} {label:<20} {row['ms']:>9.1f} "
                              f"{row['gparams_per_s']:>9.3f} {row['gb_per_s']:>7.1f}", flush=True)
                del params, moments
    print(json.dumps({"benchmark": "cpu_adam", "triad_gb_per_s": triad, "rows": rows}))


if __name__ == "__main__":
    main()
