"""ZeRO-Offload of the optimizer: deepscale vs DeepSpeed 0.19.8 on the 23M GPT, same run.

    python benchmarks/bench_offload.py                          # stages 2,3 x offload cpu, 2 ranks
    python benchmarks/bench_offload.py --offload cpu,nvme --nvme_path /mnt/nvme --repeats 3
    python benchmarks/bench_offload.py --deepspeed_python /work/venv-ds/bin/python

Each (framework, offload, stage) row is its own group of ranks (bench_engine.py's worker with
``zero_optimization.offload_optimizer`` set), repeated ``--repeats`` times interleaved so load
from other work hits every row alike; medians are reported. DeepSpeed runs from its own
Python (a venv with deepspeed installed) and is skipped with a message when missing. Both
engines get the same model, batches and AdamW hyper-parameters and step with their compiled
CPU Adam, as offload users run them. Prints a table and one JSON line.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402
import bench_engine  # noqa: E402

DEFAULT_DS_PYTHON = "/work/venv-ds/bin/python"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="2,3")
    p.add_argument("--offload", default="cpu", help="comma list of cpu, nvme")
    p.add_argument("--frameworks", default="deepscale,deepspeed")
    p.add_argument("--nvme_path", default=None, help="swap directory for --offload nvme (default: a temp dir)")
    p.add_argument("--deepspeed_python", default=DEFAULT_DS_PYTHON)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out_dir", default=None)
    args = p.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",")]
    args.offload = args.offload.split(",")
    args.frameworks = args.frameworks.split(",")
    return args


def engine_args(args):
    """bench_engine's defaults (the 23M GPT) with this run's steps, ranks and threads."""
    eargs = bench_engine.parse_args(["--steps", str(args.steps), "--warmup", str(args.warmup), "--nproc",
                                     str(args.nproc), "--timeout", str(args.timeout)]
                                    + (["--threads", str(args.threads)] if args.threads else []))
    eargs.bf16_steps, eargs.bf16_warmup = args.steps, args.warmup
    return eargs


def run_row(args, eargs, framework, offload, stage, out_dir: Path, nvme_path: str) -> dict:
    python = sys.executable if framework == "deepscale" else args.deepspeed_python
    if not os.path.exists(python):
        return {"framework": framework, "offload": offload, "stage": stage,
                "skipped": f"no Python at {python} (--deepspeed_python)"}
    spec_extra = {"offload": offload, "nvme_path": os.path.join(nvme_path, f"{framework}_{stage}")}
    row = bench_engine.run_one(eargs, framework, args.dtype, stage, out_dir, python=python, spec_extra=spec_extra)
    return dict(row, offload=offload)


def main(argv=None):
    args = parse_args(argv)
    eargs = engine_args(args)
    base = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_offload_"))
    nvme_path = args.nvme_path or str(base / "nvme")
    rows = []
    for repeat in range(args.repeats):
        for stage in args.stages:
            for offload in args.offload:
                for framework in args.frameworks:
                    out = base / f"r{repeat}_{framework}_{offload}_s{stage}"
                    rows.append(run_row(args, eargs, framework, offload, stage, out, nvme_path))
                    print(json.dumps({k: rows[-1].get(k) for k in ("framework", "offload", "stage", "step_ms",
                                                                     "error", "skipped")}), flush=True)
    merged = {}
    for row in rows:
        merged.setdefault((row["framework"], row["offload"], row["stage"]), []).append(row)
    table = []
    for (framework, offload, stage), group in merged.items():
        good = [r for r in group if "step_ms" in r]
        entry = {"framework": framework, "offload": offload, "stage": stage, "repeats": len(good)}
        if good:
            entry.update(step_ms=common.median([r["step_ms"] for r in good]),
                         step_ms_all=[round(r["step_ms"], 1) for r in good],
                         peak_rss_mib=max(max(r["peak_rss_mib"]) for r in good),
                         loss_at_10=good[0].get("loss_at_10"))
        else:
            entry["error"] = group[0].get("error") or group[0].get("skipped")
        table.append(entry)
    for entry in table:
        if entry["framework"] == "deepscale" and "step_ms" in entry:
            ds = next((e for e in table if e["framework"] == "deepspeed" and e["offload"] == entry["offload"]
                       and e["stage"] == entry["stage"] and "step_ms" in e), None)
            entry["speedup_vs_deepspeed"] = ds["step_ms"] / entry["step_ms"] if ds else None
    print(f"{'framework':10} {'offload':7} {'stage':5} {'step ms':>9} {'vs DS':>6} {'RSS MiB':>8} {'loss@10':>8}")
    for e in table:
        if "step_ms" not in e:
            print(f"{e['framework']:10} {e['offload']:7} {e['stage']:5} {'-':>9}  {e['error']}")
            continue
        speed = e.get("speedup_vs_deepspeed")
        print(f"{e['framework']:10} {e['offload']:7} {e['stage']:5} {e['step_ms']:9.1f} "
              f"{(f'{speed:.2f}x' if speed else '-'):>6} {e['peak_rss_mib']:8.0f} "
              f"{(e['loss_at_10'] or float('nan')):8.4f}")
    print(json.dumps({"bench": "offload", "nproc": args.nproc, "steps": args.steps, "dtype": args.dtype,
                      "rows": table}))


if __name__ == "__main__":
    main()
