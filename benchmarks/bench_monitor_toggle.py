"""Step-time overhead of the monitors, measured on one engine whose monitors are switched on and
off from step to step (a paired, interleaved A/B that creation order and memory layout cannot bias).

Each rank builds one engine (bench_monitor.py's model and config, tensorboard + csv_monitor on).
Every round runs three optimizer steps in a rotating order: ``on`` (monitors writing, as
configured), ``off`` (the engine's per-step monitor work switched off, exactly as an engine built
without monitor sections: no token counting, no loss read-back, no events) and ``off_again``
(the same as ``off``: its difference to ``off`` is the noise floor). Rank 0's step times are
paired within each round, both wall-clock and the process's CPU time (``time.process_time``:
all of rank 0's threads, the monitors' writer threads included), which a loaded machine
inflates far less than wall time.

    python benchmarks/bench_monitor_toggle.py --nproc 2 --rounds 150 --warmup 10

Prints the medians, the median paired differences, and one JSON line.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_monitor  # noqa: E402
from benchmarks._bench_common import median, spawn_and_collect  # noqa: E402

VARIANTS = ("on", "off", "off_again")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--model_args", default="", help="extra bench_monitor.py model flags, e.g. '--d_model 256'")
    return p.parse_args(argv)


def _worker(rank, args, port, out_dir, result_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import deepscale
    import deepscale.comm as dist

    model_args = bench_monitor.parse_args(["--nproc", str(args.nproc)] + args.model_args.split())
    engine = deepscale.initialize(model=bench_monitor._model(model_args, torch),
                                  config=bench_monitor._config(model_args, "monitors", out_dir))[0]
    reporter = engine._reporter
    metrics_on = reporter._metrics  # None on rank 1: it never writes, so its steps are alike anyway
    gen = torch.Generator().manual_seed(rank)
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds + args.warmup):
        ids = torch.randint(0, model_args.vocab_size, (model_args.micro_bs, model_args.seq_len + 1), generator=gen)
        order = VARIANTS[rnd % 3:] + VARIANTS[:rnd % 3]
        for variant in order:
            reporter._metrics = metrics_on if variant == "on" else None
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            engine.backward(engine(ids))
            engine.step()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if rnd >= args.warmup:
                times[variant].append(elapsed * 1e3)
                cpu[variant].append(elapsed_cpu * 1e3)
    reporter._metrics = metrics_on
    engine.destroy()
    if rank == 0:
        with open(result_path, "w") as handle:
            json.dump({"times": times, "cpu": cpu, "writes": metrics_on is not None}, handle)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    result = spawn_and_collect(_worker, args.nproc, args)
    summary = {}
    print(f"{'clock':<6}{'variant':<10}{'median ms':>11}{'paired diff vs off, median':>30}")
    for clock in ("times", "cpu"):
        samples = result[clock]
        base = median(samples["off"])
        for variant in VARIANTS:
            diffs = [a - b for a, b in zip(samples[variant], samples["off"])]
            row = {"median_ms": median(samples[variant]), "paired_diff_ms": median(diffs),
                   "paired_diff_pct": 100 * median(diffs) / base}
            summary[f"{'wall' if clock == 'times' else 'cpu'}_{variant}"] = row
            print(f"{'wall' if clock == 'times' else 'cpu':<6}{variant:<10}{row['median_ms']:>11.2f}"
                  f"{row['paired_diff_ms']:>+21.3f} ms ({row['paired_diff_pct']:+.2f}%)")
    print(json.dumps({"bench": "monitor_toggle", "nproc": args.nproc, "rounds": args.rounds,
                      "model_args": args.model_args, "rank0_writes": result["writes"], **summary}))
    return summary


if __name__ == "__main__":
    main()
