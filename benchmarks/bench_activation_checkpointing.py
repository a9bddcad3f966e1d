"""Forward+backward time of a 12-layer MLP-block model with and without activation checkpointing.

Rows: no checkpointing, PyTorch's ``torch.utils.checkpoint`` (non-reentrant), deepscale
``checkpoint`` (reentrant), ``non_reentrant_checkpoint`` and ``non_reentrant_checkpoint`` with
selective checkpointing of matrix products. Modes are interleaved round by round so machine load
hits them alike; the table gives the median ms per fwd+bwd and the ratio to no checkpointing,
and the last line is JSON. Every mode must produce the gradients of the plain run bitwise
(checked once before timing). Saved-activation memory is measured by
tests/unit/activation_checkpointing/test_checkpoint_memory_and_partition.py.

    python benchmarks/bench_activation_checkpointing.py --layers 12 --width 256 --tokens 2048 --rounds 15
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint as torch_checkpoint  # noqa: E402

import deepscale.checkpointing as ckpt  # noqa: E402
from benchmarks._bench_common import format_table, median  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 4 * width)
        self.fc2 = torch.nn.Linear(4 * width, width)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


MODES = {
    "none": lambda block, x: block(x),
    "torch non-reentrant": lambda block, x: torch_checkpoint(block, x, use_reentrant=False),
    "deepscale reentrant": ckpt.checkpoint,
    "deepscale non-reentrant": ckpt.non_reentrant_checkpoint,
    "deepscale selective (matmuls kept)": lambda block, x: ckpt.non_reentrant_checkpoint(
        block, x, context_fn=ckpt.selective_checkpoint_context()),
}


def step(blocks, x, run):
    blocks.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    h = x
    for block in blocks:
        h = run(block, h)
    h.square().mean().backward()
    return [p.grad for p in blocks.parameters()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block(args.width) for _ in range(args.layers)])
    x = torch.randn(args.tokens, args.width)
    ref = step(blocks, x, MODES["none"])
    for name, run in MODES.items():
        if not all(torch.equal(a, b) for a, b in zip(step(blocks, x, run), ref)):
            raise SystemExit(f"{name}: gradients differ from the plain run")
    times = {name: [] for name in MODES}
    for _ in range(args.rounds):
        for name, run in MODES.items():
            start = time.perf_counter()
            step(blocks, x, run)
            times[name].append((time.perf_counter() - start) * 1e3)
    base = median(times["none"])
    rows = [[name, f"{median(t):.1f}", f"{median(t) / base:.2f}x"] for name, t in times.items()]
    print(format_table(["mode", "fwd+bwd ms", "vs none"], rows))
    print(json.dumps({"bench": "activation_checkpointing", **vars(args),
                      "ms": {name: round(median(t), 2) for name, t in times.items()}}))


if __name__ == "__main__":
    main()
