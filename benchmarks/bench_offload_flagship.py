"""ZeRO-Infinity flagship: a >= 2B-parameter GPT trained on this box with everything on NVMe.

    python benchmarks/bench_offload_flagship.py --nvme_path /mnt/nvme [--steps 3] [--n_layer 32 --d_model 2304]
    python benchmarks/bench_offload_flagship.py --nvme_path /tmp/swap --n_layer 2 --d_model 256   # smoke run

ZeRO stage 3 with ``offload_param`` and ``offload_optimizer`` both ``nvme``; the model is built
under ``deepscale.zero.Init`` so its full fp32 states (16 bytes x parameters) never exist in RAM.
Reports, per step: forward, backward and step time; the optimizer walk split into swap-in wait,
update and swap-out wait; the NVMe bytes the optimizer moved divided by the walk's time, as a
fraction of the raw bandwidth ``bench_aio.py`` measures on the same directory in the same run;
peak RSS; the losses. Then the same config under DeepSpeed (``--deepspeed_python``), whose
result or error is recorded. Prints a table and one JSON line.

Needs parameter offload (``offload_param``); until it is available the deepscale run stops
with the engine's own error, which is reported.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nvme_path", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--n_layer", type=int, default=32)
    p.add_argument("--d_model", type=int, default=2304)
    p.add_argument("--n_head", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=1)
    p.add_argument("--sub_group_size", type=int, default=50_000_000)
    p.add_argument("--deepspeed_python", default="/work/venv-ds/bin/python")
    p.add_argument("--worker", choices=("deepscale", "deepspeed"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--offload_param", choices=("nvme", "cpu", "none"), default="nvme",
                   help="parameter offload device (none: only the optimizer is on NVMe)")
    p.add_argument("--aio_size", default="1G", help="file size of the raw-bandwidth measurement")
    p.add_argument("--timeout", type=float, default=7200)
    return p.parse_args(argv)


def ds_config(args, nvme_dir):
    return {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "steps_per_print": 10**9, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
            "zero_optimization": {
                "stage": 3, "sub_group_size": args.sub_group_size,
                "offload_param": {"device": args.offload_param, "nvme_path": nvme_dir, "pin_memory": True,
                                  "buffer_count": 5},
                "offload_optimizer": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": True,
                                      "buffer_count": 3, "pipeline_read": True, "pipeline_write": True}},
            "aio": {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1}}


def worker(args):
    """One training process (rank 0 of 1); prints one JSON line."""
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29655")})
    import torch
    sys.path.insert(0, str(ROOT / "examples" / "gpt"))
    from model import GPT, GPTConfig
    engine_lib = __import__(args.worker)
    nvme_dir = os.path.join(args.nvme_path, args.worker)
    cfg = ds_config(args, nvme_dir)
    t0 = time.perf_counter()
    engine_lib.init_distributed(dist_backend="gloo") if args.worker == "deepspeed" else engine_lib.init_distributed()
    remote = None if args.offload_param == "none" else args.offload_param
    with engine_lib.zero.Init(config_dict_or_path=cfg, remote_device=remote, pin_memory=True):
        model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                              vocab_size=args.vocab_size, seq_len=args.seq_len))
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, _, _, _ = engine_lib.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    init_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    steps = []
    for _ in range(args.steps):
        t = [time.perf_counter()]
        loss = engine(batch)
        t.append(time.perf_counter())
        engine.backward(loss)
        t.append(time.perf_counter())
        engine.step()
        t.append(time.perf_counter())
        row = {"loss": float(loss), "forward_s": t[1] - t[0], "backward_s": t[2] - t[1], "step_s": t[3] - t[2]}
        offload = getattr(getattr(engine, "_train_opt", None), "offload", None)
        if offload is not None and offload.nvme is not None:
            row.update({f"opt_{k}": v for k, v in offload.nvme.last_step_stats.items()})
        steps.append(row)
        print(json.dumps({"progress": row}), flush=True)
    print(json.dumps({"result": {"num_params": num_params, "init_s": init_s, "steps": steps,
                                 "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}),
          flush=True)


def raw_bandwidth(nvme_path, size):
    """bench_aio.py's rows (GB/s per contender and direction) on a ``size`` file under ``nvme_path``."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_aio.py"), "--dir",
                          os.path.join(nvme_path, "aio_bench"), "--sizes", size, "--no-deepspeed"],
                         capture_output=True, text=True, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr[-2000:]}


def run_worker(args, framework):
    python = sys.executable if framework == "deepscale" else args.deepspeed_python
    if not os.path.exists(python):
        return {"error": f"no Python at {python}"}
    argv = [python, __file__, "--worker", framework] + [a for a in sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT) if framework == "deepscale" else "", DS_ACCELERATOR="cpu")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith('{"result"'):
            return json.loads(line)["result"]
    tail = [line for line in (out.stderr or out.stdout).splitlines() if line.strip()]
    return {"error": tail[-1] if tail else f"exit code {out.returncode}"}


def main():
    args = parse_args()
    if args.worker:
        return worker(args)
    aio = raw_bandwidth(args.nvme_path, args.aio_size)
    results = {fw: run_worker(args, fw) for fw in ("deepscale", "deepspeed")}
    raw = {d: max((r["gb_per_s"] for r in aio.get("rows", []) if r["direction"] == d
                   and r["contender"].startswith("deepscale")), default=None) for d in ("read", "write")}
    for fw, res in results.items():
        if "error" in res:
            print(f"{fw}: error: {res['error']}")
            continue
        print(f"{fw}: {res['num_params'] / 1e9:.2f}B parameters, peak RSS {res['peak_rss_gib']:.2f} GiB, "
              f"init {res['init_s']:.0f} s")
        for i, s in enumerate(res["steps"]):
            io_s = s.get("opt_step_s")
            read, written = s.get("opt_bytes_read", 0), s.get("opt_bytes_written", 0)
            moved = read + written
            rate = moved / io_s / 1e9 if io_s else None
            # the time the raw device would need for these bytes, over the time the walk took
            ideal = read / 1e9 / raw["read"] + written / 1e9 / raw["write"] if raw["read"] and raw["write"] else None
            frac = f"{ideal / io_s:.0%} of raw" if ideal and io_s else "-"
            print(f"  step {i + 1}: loss {s['loss']:.4f} forward {s['forward_s']:.1f}s backward "
                  f"{s['backward_s']:.1f}s step {s['step_s']:.1f}s (swap-in {s.get('opt_swap_in_wait_s', 0):.1f}s, "
                  f"optimizer {s.get('opt_optimizer_s', 0):.1f}s, swap-out {s.get('opt_swap_out_wait_s', 0):.1f}s); "
                  f"optimizer NVMe {moved / 1e9:.2f} GB at {rate or 0:.2f} GB/s ({frac})")
    print(json.dumps({"bench": "offload_flagship", "aio": aio, "results": results}))


if __name__ == "__main__":
    main()
