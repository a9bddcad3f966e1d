"""The launcher's thread default: the README example with no thread variables vs OMP_NUM_THREADS=1.

Runs ``deepscale --num_procs N examples/gpt/train.py --deepspeed_config examples/gpt/ds_config.json``
under each setting in turn (interleaved, ``--repeats`` rounds) and compares the example's own
throughput (tokens/s after the first step) and the command's wall time. ``--with_unset_old``
adds the pre-default behaviour (every rank one thread per core: ``OMP_NUM_THREADS=<cores>``).

    python benchmarks/bench_launcher_threads.py --repeats 2 --steps 30
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

from _bench_common import REPO_ROOT, format_table, free_port, median, num_cores

_DONE_RE = re.compile(r"done: (\d+) steps in ([\d.]+)s, loss ([\d.]+) -> ([\d.]+), (\d+) tokens/s")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _run(setting: dict, nproc: int, steps: int, timeout_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
    env.update(setting)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "deepscale.launcher", "--num_procs", str(nproc), "--master_port", str(free_port()),
           "examples/gpt/train.py", "--deepspeed_config", "examples/gpt/ds_config.json", "--steps", str(steps)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    match = _DONE_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"run {setting} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"wall_s": wall, "train_s": float(match.group(2)), "tokens_per_s": float(match.group(5)),
            "final_loss": float(match.group(4)), "load_before": load, "load_after": os.getloadavg()[0]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="the example's --steps (its default: 60)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--with_unset_old", action="store_true",
                        help="also run OMP_NUM_THREADS=<cores> per rank (the behaviour before the default)")
    parser.add_argument("--timeout_s", type=float, default=1800)
    args = parser.parse_args(argv)
    settings = {"no thread variables": {}, "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}
    if args.with_unset_old:
        settings[f"OMP_NUM_THREADS={num_cores()} (old)"] = {"OMP_NUM_THREADS": str(num_cores())}
    results = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, setting in settings.items():
            results[name].append(_run(setting, args.nproc, args.steps, args.timeout_s))
    base = median([r["tokens_per_s"] for r in results["OMP_NUM_THREADS=1"]])
    rows = []
    for name, runs in results.items():
        tok = median([r["tokens_per_s"] for r in runs])
        rows.append([name, " / ".join(f"{r['tokens_per_s']:.0f}" for r in runs), f"{tok:.0f}", f"{tok / base:.2f}",
                     " / ".join(f"{r['wall_s']:.1f}" for r in runs),
                     " / ".join(f"{r['load_before']:.1f}" for r in runs)])
    print(format_table(["setting", "tokens/s per run", "median", "vs OMP=1", "wall s per run", "load before"], rows))
    summary = {"nproc": args.nproc, "steps": args.steps, "cores": num_cores(), "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
