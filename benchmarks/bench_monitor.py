"""Step-time overhead of the monitors and the comms logger: off vs on, interleaved.

Each rank builds one engine per variant over identical copies of a small transformer and runs
their optimizer steps in turn (rotating which goes first each round), so machine noise hits
every variant alike. Variants: ``off`` and ``off_again`` (an A/A pair: the noise floor); ``monitors`` (tensorboard and csv_monitor on, plus wandb
offline with ``--wandb``); ``comms`` (the comms logger recording every collective).

    python benchmarks/bench_monitor.py --nproc 2 --rounds 60 --warmup 5

Prints a table and one JSON line (median step ms per variant, overhead vs off).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._bench_common import median, spawn_and_collect  # noqa: E402

# "off_again" is a second engine with everything off: its difference to "off" is the noise floor.
VARIANTS = ("off", "monitors", "comms", "off_again")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=60, help="optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="first rounds left out")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--micro_bs", type=int, default=4)
    p.add_argument("--order", default=",".join(VARIANTS),
                   help="creation and rotation order of the variants (to check that position does not matter)")
    p.add_argument("--wandb", action="store_true", help="add a wandb (offline) monitor to the monitors variant")
    return p.parse_args(argv)


def _model(args, torch):
    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(args.vocab_size, args.d_model)
            layer = torch.nn.TransformerEncoderLayer(args.d_model, 4, 4 * args.d_model, batch_first=True)
            self.body = torch.nn.TransformerEncoder(layer, args.n_layer)
            self.head = torch.nn.Linear(args.d_model, args.vocab_size)

        def forward(self, ids):
            logits = self.head(self.body(self.embed(ids[:, :-1])))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    torch.manual_seed(0)
    return TinyLM()


def _config(args, variant, out_dir):
    cfg = {"train_micro_batch_size_per_gpu": args.micro_bs, "gradient_accumulation_steps": 1,
           "train_batch_size": args.micro_bs * args.nproc, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "gradient_clipping": 1.0}
    if variant == "monitors":
        cfg["tensorboard"] = {"enabled": True, "output_path": out_dir, "job_name": "tb"}
        cfg["csv_monitor"] = {"enabled": True, "output_path": out_dir, "job_name": "csv"}
        if args.wandb:
            cfg["wandb"] = {"enabled": True, "project": "bench"}
    return cfg


def _comms_call_cost_us(dist, torch, calls=400):
    """Median time of a 1-element all_reduce with the comms logger off and on, interleaved."""
    x = torch.ones(1)
    times = {False: [], True: []}
    for i in range(calls):
        enabled = bool(i % 2)
        dist.configure(enabled=enabled)
        start = time.perf_counter()
        dist.all_reduce(x)
        times[enabled].append((time.perf_counter() - start) * 1e6)
    dist.configure(enabled=False)
    dist.reset_comms_log()
    return {"off": median(times[False]), "on": median(times[True])}


def _worker(rank, args, port, out_dir, result_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="offline", WANDB_DIR=out_dir, WANDB_SILENT="true")
    import torch
    import deepscale
    import deepscale.comm as dist

    variants = tuple(args.order.split(","))
    if sorted(variants) != sorted(VARIANTS):
        raise ValueError(f"--order must list each of {VARIANTS} once, got {args.order!r}")
    engines = {v: deepscale.initialize(model=_model(args, torch), config=_config(args, v, out_dir))[0]
               for v in variants}
    gen = torch.Generator().manual_seed(rank)
    # Rank 0's own time building and writing the step's events (less noisy than a step-time difference).
    monitor, write_ms = engines["monitors"].monitor, []
    metrics = engines["monitors"]._reporter._metrics
    real_events = metrics.step_events if metrics is not None else None

    def timed_events():
        t0 = time.perf_counter()
        events = real_events()
        monitor.write_events(events)
        write_ms.append((time.perf_counter() - t0) * 1e3)
        return []

    if metrics is not None:
        metrics.step_events = timed_events
    times = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds + args.warmup):
        ids = torch.randint(0, args.vocab_size, (args.micro_bs, args.seq_len + 1), generator=gen)
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for variant in order:
            engine = engines[variant]
            dist.barrier()
            dist.configure(enabled=variant == "comms")
            start = time.perf_counter()
            engine.backward(engine(ids))
            engine.step()
            elapsed = time.perf_counter() - start
            dist.configure(enabled=False)
            if rnd >= args.warmup:
                times[variant].append(elapsed * 1e3)
    calls = sum(r["count"] for by in dist.comms_logger.summary_dict().values() for r in by.values())
    call_us = _comms_call_cost_us(dist, torch)
    for engine in engines.values():
        engine.destroy()
    if rank == 0:
        with open(result_path, "w") as handle:
            json.dump({"times": times, "comm_calls_logged": calls, "write_ms": write_ms[args.warmup:],
                       "call_us": call_us}, handle)
    dist.barrier()  # no rank leaves while another still uses the group
    dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    result = spawn_and_collect(_worker, args.nproc, args)
    base = median(result["times"]["off"])
    summary = {v: {"median_ms": median(result["times"][v]), "overhead_pct": 100 * (median(result["times"][v]) / base - 1)}
               for v in VARIANTS}
    print(f"{'variant':<10}{'median step ms':>16}{'vs off':>10}")
    for v in VARIANTS:
        print(f"{v:<10}{summary[v]['median_ms']:>16.2f}{summary[v]['overhead_pct']:>+9.2f}%")
    call_us = result["call_us"]
    print(f"1-element all_reduce: median {call_us['off']:.1f} us logger off, {call_us['on']:.1f} us on")
    write_ms = median(result["write_ms"])
    print(f"rank 0 monitor events (build + write_events): median {write_ms:.3f} ms per step ({100 * write_ms / base:.2f}% of the off "
          f"step)")
    print(json.dumps({"bench": "monitor", "order": args.order, "nproc": args.nproc, "rounds": args.rounds, "wandb": args.wandb,
                      "comm_calls_logged": result["comm_calls_logged"], "write_events_ms": write_ms, "all_reduce_1elem_us": call_us, **summary}))
    return summary


if __name__ == "__main__":
    main()
