"""Step time of an 8-layer GPT on a 4-stage pipeline per schedule, against DeepSpeed's 1F1B.

    python benchmarks/bench_pipeline_gpt.py --schedules 1f1b,interleaved_1f1b,zb_h1,zb_v
    /work/venv-ds/bin/python benchmarks/bench_pipeline_gpt.py --impl deepspeed

Same layers, data and optimizer (SGD) for both; prints a table and one JSON line with the median
step time. Real compute: on a machine with fewer cores than ranks the stages compete for CPU, so
a schedule's bubble matters less than its overheads (see docs/benchmarks.md).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pipeline_bubble import _VIRTUAL  # noqa: E402

VOCAB, SEQ = 512, 64


class Embed(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, hidden)
        self.pos = torch.nn.Parameter(torch.zeros(SEQ, hidden))

    def forward(self, ids):
        return self.tok(ids) + self.pos


class Block(torch.nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, hidden, heads=4):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)
        self.attn = torch.nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(4 * hidden, hidden))
        self.register_buffer("mask", torch.triu(torch.full((SEQ, SEQ), float("-inf")), 1), persistent=False)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Head(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.ln = torch.nn.LayerNorm(hidden)
        self.out = torch.nn.Linear(hidden, VOCAB)

    def forward(self, x):
        return self.out(self.ln(x))


def lm_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def _layers(args):
    torch.manual_seed(0)
    return [Embed(args.hidden)] + [Block(args.hidden) for _ in range(args.layers)] + [Head(args.hidden)]


def _data(args):
    gen = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, VOCAB, (args.micro_batch, SEQ), generator=gen)
        yield ids, torch.roll(ids, -1, dims=1)


def _worker(rank, args, schedule, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.stages), LOCAL_SIZE=str(args.stages))
    torch.set_num_threads(1)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.micro_batches,
              "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, "steps_per_print": 10**6}
    if args.impl == "deepspeed":
        import deepspeed
        from deepspeed.pipe import PipelineModule
        deepspeed.init_distributed(dist_backend="gloo")
        model = PipelineModule(_layers(args), num_stages=args.stages, loss_fn=lm_loss, partition_method="uniform")
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    else:
        import deepscale
        from deepscale.pipe import PipelineModule
        deepscale.init_distributed(dist_backend="gloo")
        v, placement = _VIRTUAL.get(schedule, (1, "loop"))
        model = PipelineModule(_layers(args), num_stages=args.stages, loss_fn=lm_loss, partition_method="uniform",
                               num_virtual_stages=v, virtual_placement=placement)
        config["pipeline"] = {"schedule": schedule}
        engine, _, _, _ = deepscale.initialize(model=model, config=config)
    data = _data(args)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        torch.distributed.barrier()
        start = time.perf_counter()
        losses.append(float(engine.train_batch(data)))
        torch.distributed.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put((times, losses))
    torch.distributed.barrier()


def measure(args, schedule):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, schedule, queue)) for r in range(args.stages)]
    for p in procs:
        p.start()
    times, losses = queue.get(timeout=1200)
    for p in procs:
        p.join()
    return sorted(times)[len(times) // 2], losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("deepscale", "deepspeed"), default="deepscale")
    parser.add_argument("--schedules", default="1f1b,interleaved_1f1b,zb_h1,zb_v")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--port", type=int, default=29641)
    args = parser.parse_args(argv)
    rows = []
    for schedule in (["1f1b"] if args.impl == "deepspeed" else args.schedules.split(",")):
        args.port += 1
        step, losses = measure(args, schedule)
        rows.append({"impl": args.impl, "schedule": schedule, "step_s": round(step, 4),
                     "first_loss": round(losses[0], 4)})
    print(f"{'impl':10} {'schedule':18} {'step s':>8} {'loss[0]':>8}")
    for r in rows:
        print(f"{r['impl']:10} {r['schedule']:18} {r['step_s']:8.3f} {r['first_loss']:8.4f}")
    print(json.dumps({"benchmark": "pipeline_gpt", "layers": args.layers, "hidden": args.hidden,
                      "micro_batches": args.micro_batches, "rows": rows}))


if __name__ == "__main__":
    main()
