"""Measured pipeline bubble per schedule on sleep-compute stages, against the formulas and DeepSpeed.

Each stage's compute is a fixed sleep (``pipe_sleep_model.py``), so the wall time of a step is the
schedule's own makespan even with many ranks on a 2-core machine. The bubble fraction is
``1 - slept / step`` averaged over ranks, where ``slept`` is the time each rank actually spent in
its sleep layers (a loaded machine oversleeps: that is compute, not bubble); ``nominal`` is
``1 - m * (F + B) / step`` with the requested sleep times.

    python benchmarks/bench_pipeline_bubble.py --stages 4 --micro-batches 8 \\
        --schedules 1f1b,interleaved_1f1b,zb_h1,zb_v
    /work/venv-ds/bin/python benchmarks/bench_pipeline_bubble.py --impl deepspeed --stages 4 --micro-batches 8

Prints a table and one JSON line. ``--impl deepspeed`` runs DeepSpeed's PipelineEngine (1F1B) on
the same layers.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipe_sleep_model import SLEPT, SleepLayer, sleep_loss  # noqa: E402

_VIRTUAL = {"interleaved_1f1b": (2, "loop"), "zb_v": (2, "v")}


def _layers(args, v):
    # One sleep layer per chunk; a stage's work per micro-batch is F + I + W whatever v is.
    unit = args.unit_ms / 1000.0 / v
    return [SleepLayer(forward_s=unit, input_s=unit, weight_s=unit) for _ in range(args.stages * v)]


def _data(args):
    while True:
        x = torch.randn(2, 4)
        yield x, torch.zeros(2, 4)


def _worker(rank, args, schedule, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.stages), LOCAL_SIZE=str(args.stages))
    torch.set_num_threads(1)
    v, placement = _VIRTUAL.get(schedule, (1, "loop"))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": args.micro_batches,
              "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, "steps_per_print": 10**6}
    if args.impl == "deepspeed":
        import deepspeed
        from deepspeed.pipe import PipelineModule
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        model = PipelineModule(_layers(args, 1), num_stages=args.stages, loss_fn=sleep_loss,
                               partition_method="uniform")
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    else:
        import deepscale
        from deepscale.pipe import PipelineModule
        deepscale.init_distributed(dist_backend="gloo")
        model = PipelineModule(_layers(args, v), num_stages=args.stages, loss_fn=sleep_loss,
                               partition_method="uniform", num_virtual_stages=v, virtual_placement=placement)
        config["pipeline"] = {"schedule": schedule}
        engine, _, _, _ = deepscale.initialize(model=model, config=config)
    data = _data(args)
    times, slept = [], []
    for step in range(args.warmup + args.steps):
        torch.distributed.barrier()
        start, before = time.perf_counter(), SLEPT[0]
        engine.train_batch(data)
        torch.distributed.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            slept.append(SLEPT[0] - before)
    queue.put((rank, times, slept))
    torch.distributed.barrier()


def measure(args, schedule: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, schedule, args.port, queue))
             for r in range(args.stages)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    times = results[0][1]
    # Per step: idle share = 1 - (mean over ranks of the time actually slept) / step time.
    bubbles = [1 - sum(r[2][i] for r in results) / len(results) / times[i] for i in range(len(times))]
    order = sorted(range(len(times)), key=times.__getitem__)
    median = order[len(order) // 2]
    return times[median], bubbles[median]


def expected(args, schedule: str):
    """(formula, simulated) bubble fractions; None where deepscale is not importable (DeepSpeed venv)."""
    p, m = args.stages, args.micro_batches
    formula = {"1f1b": (p - 1) / (m + p - 1), "gpipe": (p - 1) / (m + p - 1),
               "interleaved_1f1b": (p - 1) / (2 * m + p - 1),
               "zb_h1": ((p - 1) / (3 * m)) / (1 + (p - 1) / (3 * m))}.get(schedule)
    try:
        from deepscale.runtime.pipe.schedules import train_schedule
        from deepscale.runtime.pipe.simulator import simulate
    except ImportError:
        return formula, None
    v, placement = _VIRTUAL.get(schedule, (1, "loop"))
    unit = 1.0 / v
    sim = simulate(train_schedule(schedule, p, m, v, placement), costs={"F": unit, "B": 2 * unit, "I": unit,
                                                                          "W": unit}, strict_pair_order=False)
    return formula, sim.bubble_fraction


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("deepscale", "deepspeed"), default="deepscale")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--unit-ms", type=float, default=40.0, help="F = I = W per stage and micro-batch")
    parser.add_argument("--schedules", default="1f1b,interleaved_1f1b,zb_h1,zb_v")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--port", type=int, default=29561)
    args = parser.parse_args(argv)
    schedules = ["1f1b"] if args.impl == "deepspeed" else args.schedules.split(",")
    ideal = args.micro_batches * 3 * args.unit_ms / 1000.0
    rows = []
    for index, schedule in enumerate(schedules):
        args.port += 1
        step, bubble = measure(args, schedule)
        formula, simulated = expected(args, schedule)
        rows.append({"impl": args.impl, "schedule": schedule, "stages": args.stages,
                     "micro_batches": args.micro_batches, "step_s": round(step, 4),
                     "nominal_bubble": round(1 - ideal / step, 4), "measured_bubble": round(bubble, 4),
                     "formula_bubble": None if formula is None else round(formula, 4),
                     "simulated_bubble": None if simulated is None else round(simulated, 4)})
    print(f"{'impl':10} {'schedule':18} {'step s':>8} {'nominal':>8} {'measured':>9} {'formula':>8} {'simulated':>9}")
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"{r['impl']:10} {r['schedule']:18} {r['step_s']:8.3f} {r['nominal_bubble']:8.4f} "
              f"{r['measured_bubble']:9.4f} {fmt(r['formula_bubble']):>8} {fmt(r['simulated_bubble']):>9}")
    print(json.dumps({"benchmark": "pipeline_bubble", "unit_ms": args.unit_ms, "rows": rows}))


if __name__ == "__main__":
    main()
