"""ZeRO-3 parameter offload: step time, memory and NVMe traffic of offload_param none/cpu/nvme.

    python benchmarks/bench_param_offload.py [--world 2] [--layers 6] [--d-model 512] [--steps 8]
                                             [--repeats 2] [--nvme-path /tmp/param_offload_bench]

Each (device, repeat) is its own group of ranks on gloo running the example GPT at ZeRO stage 3
(fp32, AdamW); the devices alternate (none, cpu, nvme, none, cpu, nvme, ...) so that load on a
shared machine hits them alike. Per row: median step time after 2 warm-up steps, peak RSS per
rank, and for nvme the bytes read and written per step per rank, the share of shard loads whose
read was issued ahead (the recorded-order read-ahead), and the time per step loads waited for the
disk (what read-ahead did not hide). Prints a table and one JSON line.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402

DEVICES = ("none", "cpu", "nvme")


def _config(args, device, nvme_path):
    zero = {"stage": 3, "stage3_prefetch_bucket_size": 4_000_000, "stage3_max_live_parameters": 30_000_000,
            "reduce_bucket_size": 4_000_000}
    if device != "none":
        zero["offload_param"] = {"device": device, "nvme_path": nvme_path, "max_in_cpu": 0,
                                 "buffer_count": args.buffer_count, "buffer_size": 4_000_000, "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": args.micro_batch, "train_batch_size": args.micro_batch * args.world,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}, "gradient_clipping": 1.0,
            "zero_optimization": zero, "steps_per_print": 10 ** 9}


def worker(args):
    import torch
    import deepscale
    sys.path.insert(0, str(common.REPO_ROOT / "examples" / "gpt"))
    import model as gpt
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(n_layer=args.layers, d_model=args.d_model, n_head=8, vocab_size=8192, seq_len=args.seq)
    net = gpt.GPT(cfg)
    num_params = net.num_parameters()  # before ZeRO-3 empties the parameters
    engine, _, _, _ = deepscale.initialize(model=net, model_parameters=net.parameters(),
                                           config=_config(args, args.device, args.nvme_path))
    gen = torch.Generator().manual_seed(100 + rank)
    times, losses = [], []
    offload = engine._train_opt.param_offload
    for step in range(args.steps + 2):
        ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=gen)
        if step == 2 and offload is not None:
            before = dict(offload.stats())
        start = time.perf_counter()
        loss = engine({"input_ids": ids, "labels": ids})
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    result = {"rank": rank, "step_s": statistics.median(times[2:]), "peak_rss_mib": common.peak_rss_mib(),
              "loss": losses[-1], "params": num_params}
    if offload is not None and offload.nvme is not None:
        after = offload.stats()
        steps = args.steps
        result.update(read_mib_per_step=(after["nvme_bytes_read"] - before["nvme_bytes_read"]) / steps / 2 ** 20,
                      written_mib_per_step=(after["nvme_bytes_written"] - before["nvme_bytes_written"]) / steps / 2 ** 20,
                      read_ahead=(after["loads_read_ahead"] - before["loads_read_ahead"])
                      / max(1, after["loads"] - before["loads"]),
                      load_wait_ms_per_step=(after["load_wait_s"] - before["load_wait_s"]) / steps * 1000)
    engine.destroy()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


def run_row(args, device, repeat):
    out = Path(tempfile.mkdtemp(prefix="bench_param_offload_"))
    argv = [sys.executable, __file__, "--worker", "--device", device, "--out", str(out)]
    for key in ("world", "layers", "d_model", "seq", "micro_batch", "steps", "buffer_count", "nvme_path"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    ok, message = common.launch_ranks(argv, args.world, threads=1, log_dir=out / "logs", timeout_s=args.timeout)
    if not ok:
        print(f"{device} (repeat {repeat}) failed: {message}", file=sys.stderr)
        return None
    ranks = common.read_rank_results(out, args.world)
    shutil.rmtree(out, ignore_errors=True)
    row = {"device": device, "repeat": repeat, "step_s": max(r["step_s"] for r in ranks),
           "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "loss": ranks[0]["loss"],
           "params": ranks[0]["params"]}
    for key in ("read_mib_per_step", "written_mib_per_step", "read_ahead", "load_wait_ms_per_step"):
        if key in ranks[0]:
            row[key] = statistics.mean(r[key] for r in ranks)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--buffer-count", type=int, default=4)
    parser.add_argument("--nvme-path", default=os.path.join(tempfile.gettempdir(), "param_offload_bench"))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--device", choices=DEVICES)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = [row for repeat in range(args.repeats) for device in DEVICES
            if (row := run_row(args, device, repeat)) is not None]
    headers = ["device", "repeat", "step ms", "peak RSS MiB", "NVMe read MiB/step", "written MiB/step",
               "read ahead", "load wait ms/step", "loss"]
    table = [[r["device"], r["repeat"], f"{r['step_s'] * 1000:.0f}", f"{r['peak_rss_mib']:.0f}",
              f"{r.get('read_mib_per_step', 0):.1f}", f"{r.get('written_mib_per_step', 0):.1f}",
              f"{r['read_ahead']:.0%}" if "read_ahead" in r else "-",
              f"{r['load_wait_ms_per_step']:.1f}" if "load_wait_ms_per_step" in r else "-", f"{r['loss']:.4f}"]
             for r in rows]
    print(f"GPT {rows[0]['params'] / 1e6:.1f}M parameters, {args.world} ranks, ZeRO-3 fp32, "
          f"{common.num_cores()} cores" if rows else "no rows")
    print(common.format_table(headers, table))
    print(json.dumps({"bench": "param_offload", "world": args.world, "layers": args.layers,
                      "d_model": args.d_model, "rows": rows}))


if __name__ == "__main__":
    main()
