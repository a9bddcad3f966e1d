"""deepscale attention on CPU vs torch SDPA vs naive materialised attention, in one run.

Rows: causal fwd+bwd at B x S x H x D for each dtype and thread count, the three
implementations interleaved repeat by repeat (the machine may be shared, so each figure is
the best of the repeats and the ratios come from one run); then a packed varlen batch
(lengths 256..4096) through deepscale's varlen path against SDPA on the same batch padded to
the longest sequence. Prints a table and, last, one JSON line.

    python benchmarks/bench_attention.py                      # B=1 H=8 S=4096 D=128, fp32+bf16, 1 and 2 threads
    python benchmarks/bench_attention.py --seq 1024 --repeats 2 --no-naive   # quick
    python benchmarks/bench_attention.py --numerics   # each backend's error vs a float64 reference
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepscale.ops.attention import attention, explain  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _naive(q, k, v):
    """Materialised causal attention: the [B, H, S, S] scores and probabilities exist."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = scores.shape[-1]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return (probs @ vt).transpose(1, 2)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def _fwd_bwd(fn, q, k, v, grad):
    for t in (q, k, v):
        t.grad = None
    start = time.perf_counter()
    out = fn(q, k, v)
    out.backward(grad)
    return time.perf_counter() - start


def _causal_flops(lens, heads, dim):
    """Matmul flops of causal fwd (2 matmuls) + bwd (5 matmuls incl. recompute) over the visible half."""
    return sum(7 * 2 * heads * dim * s * (s + 1) / 2 for s in lens)


def bench_dense(args, dtype_name, threads):
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.heads, args.dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=gen).to(dtype)
    impls = {"deepscale": lambda a, b, c: attention(a, b, c, causal=True), "sdpa": _sdpa}
    if args.naive:
        impls["naive"] = _naive
    backend = explain(q, k, v, causal=True).backend
    times = {name: [] for name in impls}
    for name, fn in impls.items():  # warm-up (and the op build) outside the timing
        _fwd_bwd(fn, q, k, v, grad)
    for _ in range(args.repeats):
        for name, fn in impls.items():
            times[name].append(_fwd_bwd(fn, q, k, v, grad))
    best = {name: min(t) for name, t in times.items()}
    flops = _causal_flops([args.seq] * args.batch, args.heads, args.dim)
    row = {"case": f"B{args.batch} S{args.seq} H{args.heads} D{args.dim} causal", "dtype": dtype_name,
           "threads": threads, "backend": backend, **{f"{n}_s": round(t, 4) for n, t in best.items()},
           "deepscale_gflops": round(flops / best["deepscale"] / 1e9, 1),
           "vs_sdpa": round(best["sdpa"] / best["deepscale"], 2)}
    if "naive" in best:
        row["vs_naive"] = round(best["naive"] / best["deepscale"], 2)
    return row


def bench_varlen(args, threads):
    torch.set_num_threads(threads)
    lens = [int(x) for x in args.varlen_lengths.split(",")]
    gen = torch.Generator().manual_seed(1)
    total, longest = sum(lens), max(lens)
    q, k, v = (torch.randn(total, args.heads, args.dim, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(total, args.heads, args.dim, generator=gen)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    pq, pk, pv = (torch.randn(len(lens), longest, args.heads, args.dim, generator=gen).requires_grad_()
                  for _ in range(3))
    pgrad = torch.randn(len(lens), longest, args.heads, args.dim, generator=gen)

    def ours():
        return _fwd_bwd(lambda a, b, c: attention(a, b, c, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                  max_seqlen_q=longest, max_seqlen_k=longest), q, k, v, grad)

    def padded():
        return _fwd_bwd(_sdpa, pq, pk, pv, pgrad)

    ours(), padded()
    t_ours, t_pad = [], []
    for _ in range(args.repeats):
        t_ours.append(ours())
        t_pad.append(padded())
    best_ours, best_pad = min(t_ours), min(t_pad)
    padded_tokens = len(lens) * longest
    # Target of the issue: real tokens/s of the varlen run vs SDPA's padded tokens/s.
    ratio = (total / best_ours) / (padded_tokens / best_pad)
    return {"case": f"varlen {len(lens)} seqs {min(lens)}..{longest} ({total} of {padded_tokens} padded tokens) "
                    f"H{args.heads} D{args.dim} causal", "dtype": "fp32", "threads": threads,
            "deepscale_s": round(best_ours, 4), "sdpa_padded_s": round(best_pad, 4),
            "real_over_padded_tokens": round(total / padded_tokens, 3), "vs_sdpa_padded_token_rate": round(ratio, 2)}


def numerics(args):
    """Max abs error of each CPU backend against the float64 reference, per dtype (out and dq/dk/dv)."""
    from deepscale.ops.attention import build_spec, reference_attention
    from deepscale.ops.attention.sdpa_backend import sdpa_attention
    gen = torch.Generator().manual_seed(3)
    shape = (2, 512, 4, 128)
    base = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        rounded = [t.to(dtype) for t in base]
        ref_in = [t.double().requires_grad_() for t in rounded]
        spec = build_spec(*ref_in, causal=True)
        ref_out = reference_attention(*ref_in, spec)
        ref = [ref_out] + list(torch.autograd.grad(ref_out, ref_in, grad))
        backends = {"cpu_attention": lambda a, b, c: attention(a, b, c, causal=True),
                    "sdpa": lambda a, b, c: sdpa_attention(a, b, c, build_spec(a, b, c, causal=True)),
                    "reference": lambda a, b, c: reference_attention(a, b, c, build_spec(a, b, c, causal=True))}
        for name, fn in backends.items():
            ins = [t.clone().requires_grad_() for t in rounded]
            out = fn(*ins)
            got = [out] + list(torch.autograd.grad(out, ins, grad.to(dtype)))
            errs = [(a.double() - b).abs().max().item() for a, b in zip(got, ref)]
            rows.append({"backend": name, "dtype": dtype_name,
                         **{f"err_{n}": float(f"{e:.2e}") for n, e in zip(("out", "dq", "dk", "dv"), errs)}})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the materialised baseline")
    parser.add_argument("--varlen-lengths", default="256,512,1024,2048,4096", help="'' to skip the varlen row")
    parser.add_argument("--numerics", action="store_true",
                        help="only print each backend's error against a float64 reference (B2 S512 H4 D128 causal)")
    args = parser.parse_args(argv)
    if args.numerics:
        rows = numerics(args)
        for row in rows:
            print("  ".join(f"{key}={val}" for key, val in row.items()))
        print(json.dumps({"bench": "attention_numerics", "rows": rows}))
        return
    threads = [int(t) for t in args.threads.split(",")]
    rows = [bench_dense(args, d, t) for d in args.dtypes.split(",") for t in threads]
    if args.varlen_lengths:
        rows.append(bench_varlen(args, max(threads)))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    for row in rows:
        print("  ".join(f"{key}={val}" for key, val in row.items()))
    print(json.dumps({"bench": "attention", "rows": rows}))


if __name__ == "__main__":
    main()
