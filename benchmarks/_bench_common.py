"""Shared helpers for the scripts in benchmarks/: launching ranks, timing, memory, tables.

This module must stay light to import (no torch): the per-rank workers import it before
they start measuring how long ``import torch`` and the framework set-up take.
"""
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def process_start_time() -> float:
    """Wall-clock time (``time.time()`` scale) at which this process was created.

    Uses the kernel's record via psutil so interpreter start-up is counted too; falls back to
    "now" when psutil is missing, which still precedes ``import torch`` in the workers.
    """
    try:
        import psutil
        return psutil.Process().create_time()
    except Exception:  # psutil missing or /proc unreadable: the best remaining estimate
        return time.time()


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def median(values):
    """Median of a non-empty sequence of numbers."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median() of an empty sequence")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def free_port() -> int:
    """A TCP port that is free on localhost right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def num_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def total_memory_gib() -> float:
    """Physical memory of the machine in GiB (0.0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def load_module(path, name: str):
    """Import the Python file at ``path`` under the unique module name ``name``.

    The example's files are called ``model.py`` and ``data.py``; loading them under distinct
    names keeps them from clashing with other modules of the same short name.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rank_env(rank: int, world: int, port: int, threads: int, extra=None) -> dict:
    """Environment of one rank: the torch.distributed variables plus thread counts."""
    env = dict(os.environ)
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads)})
    paths = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def launch_ranks(argv, world: int, threads: int, log_dir, timeout_s: float, extra_env=None):
    """Run ``argv`` as ``world`` local ranks and wait for all of them.

    Each rank's stdout and stderr go to ``log_dir/rank<r>.log``. If one rank fails or the
    timeout passes, the remaining ranks are terminated so nothing hangs.

    Returns:
        ``(ok, message)``: ``message`` holds the tail of the first failing rank's log.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(argv, env=rank_env(rank, world, port, threads, extra_env),
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        return _wait_all(procs, log_dir, time.monotonic() + timeout_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def _wait_all(procs, log_dir: Path, deadline: float):
    """Poll ``procs`` until all exit 0, one fails, or ``deadline`` passes."""
    while True:
        codes = [proc.poll() for proc in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                return False, f"rank {rank} exited with {code}:\n{tail(log_dir / f'rank{rank}.log')}"
        if all(code == 0 for code in codes):
            return True, ""
        if time.monotonic() > deadline:
            return False, f"timed out; rank 0 log:\n{tail(log_dir / 'rank0.log')}"
        time.sleep(0.05)


def tail(path, num_lines: int = 15) -> str:
    """The last ``num_lines`` lines of a text file ('' if it does not exist)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-num_lines:])


def read_rank_results(out_dir, world: int):
    """Load ``out_dir/rank<r>.json`` for every rank (a missing file raises)."""
    return [json.loads((Path(out_dir) / f"rank{rank}.json").read_text()) for rank in range(world)]


def format_table(headers, rows) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def spawn_and_collect(worker, nproc: int, *args):
    """Run ``worker(rank, *args, port, out_dir, result_path)`` on ``nproc`` spawned processes and
    return the JSON that rank 0 wrote to ``result_path`` (torch is imported here, not at module load)."""
    import tempfile
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        result_path = os.path.join(out_dir, "result.json")
        mp.spawn(worker, args=(*args, free_port(), out_dir, result_path), nprocs=nproc, join=True)
        with open(result_path) as handle:
            return json.load(handle)
