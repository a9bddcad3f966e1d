"""Op build times: cold JIT build and warm load of each deepscale op, and of DeepSpeed's
cpu_adam and async_io ops when DeepSpeed is installed.

    python benchmarks/bench_ops_build.py [--ops cpu_adam,cpu_adagrad,cpu_lion,async_io] [--no-deepspeed]

Each measurement runs in a fresh interpreter (torch already imported before the clock
starts) with an empty cache directory for the cold build and the same directory for the warm
load. Wall time depends on what else the machine runs; the CPU column (the child and the
compilers it waited for, torch import included) does not. Prints a table and one JSON line.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OURS = """
import time, torch
start = time.perf_counter()
from op_builder import get_builder
get_builder({op!r}).load()
print("SECONDS", time.perf_counter() - start)
"""

DEEPSPEED = """
import time, torch
start = time.perf_counter()
from deepspeed.ops.op_builder import {cls}
{cls}().load()
print("SECONDS", time.perf_counter() - start)
"""
DEEPSPEED_OPS = {"cpu_adam": "CPUAdamBuilder", "async_io": "AsyncIOBuilder"}


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(code, env_updates):
    """(wall seconds measured inside the child, CPU seconds of the child and its compilers)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_updates)
    cpu_before = _children_cpu()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    cpu = _children_cpu() - cpu_before
    for line in proc.stdout.splitlines():
        if line.startswith("SECONDS"):
            return float(line.split()[1]), cpu
    raise RuntimeError(f"measurement failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def deepspeed_available():
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True)
    return proc.returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="cpu_adam,cpu_adagrad,cpu_lion,async_io")
    parser.add_argument("--no-deepspeed", action="store_true")
    args = parser.parse_args()
    rows = []
    print(f"{'library':<10} {'op':<12} {'cold build s':>13} {'cold CPU s':>11} {'warm load s':>12}")
    runs = [("deepscale", op, OURS.format(op=op), "DEEPSCALE_OP_CACHE") for op in args.ops.split(",")]
    if not args.no_deepspeed and deepspeed_available():
        runs += [("deepspeed", op, DEEPSPEED.format(cls=cls), "TORCH_EXTENSIONS_DIR")
                 for op, cls in DEEPSPEED_OPS.items() if op in args.ops.split(",")]
    for library, op, code, cache_var in runs:
        with tempfile.TemporaryDirectory(prefix=f"build_{library}_{op}_") as cache:
            cold, cold_cpu = timed(code, {cache_var: cache})
            warm, _ = timed(code, {cache_var: cache})
        rows.append(dict(library=library, op=op, cold_s=cold, cold_cpu_s=cold_cpu, warm_s=warm))
        print(f"{library:<10} {op:<12} {cold:>13.2f} {cold_cpu:>11.1f} {warm:>12.3f}", flush=True)
    print(json.dumps({"benchmark": "op_build", "rows": rows}))


if __name__ == "__main__":
    main()
