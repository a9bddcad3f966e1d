"""Per-rank activation memory of Ulysses sequence parallelism: SP=N over SP=1 at a long sequence.

Usage::

    python benchmarks/bench_sp_memory.py --seq 16384 --world 4

Each of ``--world`` gloo ranks runs one forward of the example GPT (2 layers, d_model 64, 8
heads) with ``DistributedAttention`` on its slice of the sequence, and once more on the whole
sequence alone (a one-rank group, SP=1). The figure is the bytes autograd saves for backward
(parameters excluded, shared storages once) -- the activation memory a step must hold -- which
is deterministic, so the 2-core machine's load does not disturb it. Prints a table and one JSON line.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402


def _worker(seq: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    models = common.load_module(common.REPO_ROOT / "tests" / "unit" / "parallel" / "_tp_models.py", "tp_models")
    ratio, full, sharded = models.sp_activation_ratio(seq)
    Path(f"{out}.rank{dist.get_rank()}").write_text(json.dumps({"ratio": ratio, "sp1_bytes": full,
                                                                "spN_bytes": sharded}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.seq, args.worker)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        ok, message = common.launch_ranks([sys.executable, os.path.abspath(__file__), "--seq", str(args.seq),
                                           "--worker", out], args.world, 1, Path(tmp) / "logs", 3600)
        if not ok:
            print(message)
            return 1
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(args.world)]
    worst = max(ranks, key=lambda r: r["ratio"])
    print(f"{'seq':>6} {'sp':>3} {'SP=1 MiB':>9} {'SP=N MiB (worst rank)':>22} {'ratio':>6}")
    print(f"{args.seq:>6} {args.world:>3} {worst['sp1_bytes'] / 2**20:>9.1f} {worst['spN_bytes'] / 2**20:>22.1f} "
          f"{worst['ratio']:>6.3f}")
    print(json.dumps({"bench": "sp_memory", "seq": args.seq, "sp": args.world, "ranks": ranks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
