"""Async I/O throughput: write and read a tensor to a file with deepscale's aio op (io_uring and
libaio backends, locked and ordinary buffers) against a chunked O_DIRECT loop, fio, and
DeepSpeed's async_io op.

    python benchmarks/bench_aio.py [--dir /tmp/aio_bench] [--sizes 1G,4G] [--block-size 1M]
                                   [--queue-depth 8] [--threads 1]

The page cache is dropped before every transfer when /proc/sys/vm/drop_caches is writable
(root); all contenders use O_DIRECT, so the cache matters little either way. Contenders run
one after another for each size and direction (write first, then read back the same file).
Prints a table and one JSON line.
"""
import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepscale.ops.aio import AsyncIOHandle, new_cpu_locked_tensor  # noqa: E402


def parse_size(text):
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMG" else text) * scale)


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(fn, fresh_path=None):
    if fresh_path is not None and os.path.exists(fresh_path):
        os.remove(fresh_path)  # every writer starts from no file: same block allocation work
    drop_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def direct_loop(path, nbytes, block, is_read):
    """One thread, one aligned block buffer, synchronous O_DIRECT pread/pwrite: the simple baseline."""
    buf = mmap.mmap(-1, block)  # page aligned
    flags = (os.O_RDONLY if is_read else os.O_WRONLY | os.O_CREAT | os.O_TRUNC) | os.O_DIRECT
    fd = os.open(path, flags, 0o644)
    try:
        if not is_read:
            os.posix_fallocate(fd, 0, nbytes)  # same courtesy as the engines: no extending writes
        for offset in range(0, nbytes, block):
            if is_read:
                os.preadv(fd, [buf], offset)
            else:
                os.pwrite(fd, buf, offset)
    finally:
        os.close(fd)


def fio(path, nbytes, block, depth, threads, is_read):
    if shutil.which("fio") is None:
        return None
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={'read' if is_read else 'write'}", f"--bs={block}",
           f"--size={nbytes}", "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", f"--numjobs={threads}",
           "--group_reporting", "--output-format=json"]
    if not is_read and os.path.exists(path):
        os.remove(path)
    drop_caches()
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    job = out["jobs"][0]["read" if is_read else "write"]
    return job["io_bytes"] / (job["runtime"] / 1000.0)  # bytes per second


def deepspeed_handle(block, depth, threads):
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        builder = AsyncIOBuilder()
        if not builder.is_compatible():
            return None
        return builder.load(verbose=False).aio_handle(block, depth, False, True, threads)
    except Exception as exc:  # not installed or cannot build: leave it out of the table
        print(f"deepspeed async_io unavailable: {exc}", file=sys.stderr)
        return None


def our_handles(args):
    """One handle per compiled backend that runs here (the Python engine when none does)."""
    settings = dict(block_size=args.block_size, queue_depth=args.queue_depth, thread_count=args.threads)
    handles = []
    for backend in ("io_uring", "libaio"):
        try:
            handles.append(AsyncIOHandle(backend=backend, **settings))
        except RuntimeError as exc:
            print(f"deepscale {backend} unavailable: {exc}", file=sys.stderr)
    return handles or [AsyncIOHandle(backend="python", **settings)]


def run_size(args, nbytes, ds, handles):
    path = os.path.join(args.dir, "bench.bin")
    results = []

    def record(name, direction, seconds=None, rate=None):
        gbps = (rate if rate is not None else nbytes / seconds) / 1e9
        results.append(dict(contender=name, direction=direction, bytes=nbytes, gb_per_s=gbps))
        size = f"{nbytes >> 30} GiB" if nbytes >= 1 << 30 else f"{nbytes >> 20} MiB"
        print(f"{size:>8} {direction:<6} {name:<30} {gbps:>7.2f}", flush=True)

    # An ordinary torch.empty tensor starts 64 bytes into a page: not aligned for O_DIRECT.
    buffers = {"locked": new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8)),
               "ordinary": torch.empty(nbytes, dtype=torch.uint8)}
    for buf in buffers.values():
        buf.fill_(7)
    for direction in ("write", "read"):
        is_read = direction == "read"
        for kind, buf in buffers.items():
            fresh = None if is_read else path
            for ours in handles:
                op = ours.sync_pread if is_read else ours.sync_pwrite
                record(f"deepscale {ours.backend} ({kind})", direction, timed(lambda: op(buf, path), fresh))
            if ds is not None:
                ds_op = ds.sync_pread if is_read else ds.sync_pwrite
                record(f"deepspeed async_io ({kind})", direction, timed(lambda: ds_op(buf, path), fresh))
        record("O_DIRECT loop (1 thread)", direction,
               timed(lambda: direct_loop(path, nbytes, args.block_size, is_read), None if is_read else path))
        rate = fio(path, nbytes, args.block_size, args.queue_depth, args.threads, is_read)
        if rate is not None:
            record("fio libaio", direction, rate=rate)
    os.remove(path)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/deepscale_aio_bench")
    parser.add_argument("--sizes", default="1G,4G")
    parser.add_argument("--block-size", type=parse_size, default=1 << 20)
    parser.add_argument("--queue-depth", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-deepspeed", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    ds = None if args.no_deepspeed else deepspeed_handle(args.block_size, args.queue_depth, args.threads)
    print(f"page cache dropped between runs: {drop_caches()}")
    print(f"{'size':>8} {'dir':<6} {'contender':<30} {'GB/s':>7}")
    handles = our_handles(args)
    rows = []
    for size in args.sizes.split(","):
        rows += run_size(args, parse_size(size), ds, handles)
    print(json.dumps({"benchmark": "aio", "block_size": args.block_size, "queue_depth": args.queue_depth,
                      "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
