"""AutoTP (TP=2) and Ulysses (SP=2) training steps: deepscale against DeepSpeed, 2 ranks on gloo.

Usage::

    python benchmarks/bench_tp_sp.py                       # both modes, deepscale and deepspeed
    python benchmarks/bench_tp_sp.py --modes autotp --steps 10
    python benchmarks/bench_tp_sp.py --deepspeed-python /work/venv-ds/bin/python

Each (mode, framework) runs as 2 fresh processes with the same model, seed, batches and SGD
settings; runs alternate between frameworks (``--repeats`` rounds) so machine load hits both
alike. The figure is the median step time (forward + backward + step) after ``--warmup``
steps, per rank 0. DeepSpeed runs under the interpreter given by ``--deepspeed-python`` (a
separate venv with deepspeed 0.19.8; it is skipped when that interpreter cannot import it).

* ``autotp``: a Llama-style Hugging Face model (GQA) built from a config with random weights,
  ``tensor_parallel.autotp_size: 2`` (DeepSpeed additionally needs ``deepspeed.tp_model_init``).
* ``ulysses``: a GPT whose attention is ``sequence.layer.DistributedAttention`` over SDPA,
  ``sequence_parallel_size: 2``, each rank holding half of the sequence.

Prints a table and one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402

LLAMA = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048)


# ----------------------------------------------------------------------------- worker side

def _ulysses_model(torch, attention_cls, group, spec):
    nn, F = torch.nn, torch.nn.functional
    d, heads, vocab = spec["d_model"], spec["heads"], LLAMA["vocab_size"]

    def local(q, k, v):  # (batch, seq, heads, dim)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.attn = attention_cls(local, group, scatter_idx=2, gather_idx=1)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (t.view(b, s, heads, d // heads) for t in self.qkv(self.ln1(x)).chunk(3, dim=2))
            x = x + self.proj(self.attn(q, k, v, 0).reshape(b, s, d))  # batch_dim_idx=0, DeepSpeed's call
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(spec["seq"], d)
            self.blocks = nn.ModuleList(Block() for _ in range(spec["layers"]))
            self.head = nn.Linear(d, vocab, bias=False)

        def forward(self, ids, start):
            x = self.emb(ids) + self.pos(torch.arange(start, start + ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            return F.cross_entropy(self.head(x).view(-1, vocab), ids.reshape(-1))

    return Model()


def _worker(spec):
    import torch
    torch.set_num_threads(spec["threads"])
    fw, mode = spec["framework"], spec["mode"]
    config = {"train_micro_batch_size_per_gpu": spec["batch"], "gradient_clipping": 1.0,
              "optimizer": {"type": "SGD", "params": {"lr": 0.01}}, "zero_optimization": {"stage": 0}}
    if fw == "deepspeed":
        import deepspeed as lib
        lib.init_distributed(dist_backend="gloo")
    else:
        import deepscale as lib
        lib.init_distributed(dist_backend="gloo")
    import torch.distributed as dist
    rank = dist.get_rank()
    torch.manual_seed(0)
    if mode == "autotp":
        import transformers
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA)).float()
        config["tensor_parallel"] = {"autotp_size": 2}
        if fw == "deepspeed":
            model = lib.tp_model_init(model, tp_size=2, dtype=torch.float32)
        engine, *_ = lib.initialize(model=model, config=config)
        ids = torch.randint(0, LLAMA["vocab_size"], (spec["batch"], spec["seq"]),
                            generator=torch.Generator().manual_seed(1))

        def step():
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
    else:
        config["sequence_parallel_size"] = 2
        if fw == "deepspeed":
            from deepspeed.sequence.layer import DistributedAttention
        else:
            from deepscale.sequence.layer import DistributedAttention
        group = dist.new_group([0, 1])
        model = _ulysses_model(torch, DistributedAttention, group, spec)
        engine, *_ = lib.initialize(model=model, config=config)
        half = spec["seq"] // 2
        full = torch.randint(0, LLAMA["vocab_size"], (spec["batch"], spec["seq"]),
                             generator=torch.Generator().manual_seed(1))
        ids = full[:, rank * half:(rank + 1) * half]

        def step():
            loss = engine(ids, rank * half)
            engine.backward(loss)
            engine.step()
    times = []
    for _ in range(spec["warmup"] + spec["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"step_s": common.median(times[spec["warmup"]:]),
                                                 "rss_mib": common.peak_rss_mib()}))


# ----------------------------------------------------------------------------- driver side

def _run(python, spec, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, out=os.path.join(tmp, "result.json"))
        extra = {"BENCH_TP_SP_SPEC": json.dumps(spec), "DS_ACCELERATOR": "cpu", "DEEPSCALE_ACCELERATOR": "cpu"}
        ok, message = common.launch_ranks([python, os.path.abspath(__file__), "--worker"], 2, spec["threads"],
                                          Path(tmp) / "logs", timeout, extra_env=extra)
        if not ok:
            return {"error": message.strip().splitlines()[-1][:200] if message.strip() else "failed"}
        return json.loads(Path(spec["out"]).read_text())


def _has_deepspeed(python) -> bool:
    try:
        return subprocess.run([python, "-c", "import deepspeed"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="autotp,ulysses")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deepspeed-python", default="/work/venv-ds/bin/python")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(os.environ["BENCH_TP_SP_SPEC"]))
        return 0
    frameworks = [("deepscale", sys.executable)]
    if _has_deepspeed(args.deepspeed_python):
        frameworks.append(("deepspeed", args.deepspeed_python))
    results = {}
    for mode in args.modes.split(","):
        for _ in range(args.repeats):
            for fw, python in frameworks:  # interleaved rounds
                spec = dict(framework=fw, mode=mode, steps=args.steps, warmup=args.warmup, seq=args.seq,
                            batch=args.batch, threads=args.threads, d_model=256, heads=8, layers=4)
                results.setdefault((mode, fw), []).append(_run(python, spec, args.timeout))
    rows = []
    for (mode, fw), runs in results.items():
        good = [r["step_s"] for r in runs if "step_s" in r]
        rows.append({"mode": mode, "framework": fw, "step_ms": round(1000 * common.median(good), 1) if good else None,
                     "runs_ms": [round(1000 * g, 1) for g in good],
                     "error": next((r["error"] for r in runs if "error" in r), None)})
    print(f"{'mode':8} {'framework':10} {'step ms (median)':>17}  runs / error")
    for row in rows:
        step = "-" if row["step_ms"] is None else f"{row['step_ms']:.1f}"
        print(f"{row['mode']:8} {row['framework']:10} {step:>17}  {row['error'] or row['runs_ms']}")
    print(json.dumps({"bench": "tp_sp", "seq": args.seq, "batch": args.batch, "threads": args.threads,
                      "cores": common.num_cores(), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
