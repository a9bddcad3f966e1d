"""Run a test body on N ranks, each a spawned process with ``torch.distributed`` ready.

Usage from a test module (the body must be a module-level function so that the
workers can import it by reference; its return value must be picklable)::

    from dist_harness import run_distributed

    def _body(x):
        import torch.distributed as dist
        return dist.get_rank() * x

    @pytest.mark.parametrize("world_size", [1, 2, 4])
    def test_scale(world_size):
        assert run_distributed(_body, world_size, args=(3,)) == [3 * r for r in range(world_size)]

Note: why pools. Spawning a worker costs 2-3 s (mostly ``import torch``), far more
than most test bodies. Workers are therefore kept alive in one pool per
(world size, backend) for the whole pytest session and reused by every test. A
pool whose ranks may be out of step (a rank raised, hung or died, or a body
destroyed the default group) is killed and transparently recreated by the next
call at that world size, so one bad test cannot poison the next.

Backend: ``gloo`` by default; ``--dist-backend nccl`` (or ``DEEPSCALE_TEST_BACKEND``)
runs the same tests on NCCL with one process per GPU, skipping tests whose world
size exceeds the number of visible GPUs.
"""
import atexit
import importlib
import importlib.util
import multiprocessing
import os
import pickle
import random
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait as _wait_ready

import pytest

__all__ = [
    "run_distributed", "DistributedTestError", "DistributedTimeoutError", "shutdown_pools",
    "default_backend", "SUPPORTED_BACKENDS",
]

SUPPORTED_BACKENDS = ("gloo", "nccl")
BACKEND_ENV = "DEEPSCALE_TEST_BACKEND"
# Seconds to wait for the other ranks once one has failed: independent failures
# arrive within this window, ranks blocked in a collective never will.
ERROR_GRACE_S = 1.5
POOL_START_TIMEOUT_S = 180.0
# The harness must give up this long before pytest-timeout fires, so that its
# message (which rank hung) is the one the user sees.
OUTER_TIMEOUT_MARGIN_S = 3.0

_pools = {}
_outer_deadline = None  # monotonic time at which pytest-timeout will fire, if armed


class DistributedTestError(AssertionError):
    """A distributed test body failed on at least one rank.

    Attributes: ``errors`` (rank -> formatted traceback text), ``finished`` and
    ``unfinished`` (sorted rank lists).
    """

    def __init__(self, message, errors=None, finished=(), unfinished=()):
        super().__init__(message)
        self.errors = dict(errors or {})
        self.finished = sorted(finished)
        self.unfinished = sorted(unfinished)


class DistributedTimeoutError(DistributedTestError):
    """At least one rank did not answer within the timeout."""


def default_backend():
    """Backend chosen for this session: ``$DEEPSCALE_TEST_BACKEND`` (set by ``--dist-backend``) or gloo."""
    value = os.environ.get(BACKEND_ENV, "gloo").strip().lower() or "gloo"
    if value not in SUPPORTED_BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not supported; allowed values: "
                         f"{', '.join(SUPPORTED_BACKENDS)}")
    return value


def set_outer_deadline(seconds):
    """Record that an outer (pytest-timeout) timer of ``seconds`` starts now; ``None`` clears it."""
    global _outer_deadline
    _outer_deadline = None if seconds is None else time.monotonic() + float(seconds)


# ----------------------------------------------------------------------------- worker side


def _exit_when_orphaned(parent_pid):
    # A worker blocked in a collective never reads its pipe again, so it would
    # outlive a pytest process killed with SIGKILL. Poll the parent instead.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def _worker_setup(rank, world_size, backend, port, num_threads):
    env = {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "DEEPSCALE_ACCELERATOR": "cuda" if backend == "nccl" else "cpu",
    }
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(num_threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)


def _import_body_module(name, path):
    """Import the test module that defines the body, by name or (importlib mode) by file."""
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        if not path:
            raise
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _reset_state(num_threads):
    """Give every body the same starting point: seeds, threads, default dtype, grad mode."""
    import torch
    random.seed(0)
    torch.manual_seed(0)  # also seeds every CUDA device
    try:
        import numpy
        numpy.random.seed(0)
    except ImportError:
        pass
    torch.set_num_threads(num_threads)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)


def _destroy_extra_groups():
    """Destroy process groups a body left behind; returns False if the default group is gone."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    if not dist.is_initialized():
        return False
    world = c10d._get_default_group()
    for group in list(c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)
    return True


def _run_task(message):
    """Execute one pickled task; returns (kind, payload, keep_worker)."""
    sys_path, module_name, module_path, payload, num_threads = message
    sys.path[:] = sys_path
    environ, cwd = dict(os.environ), os.getcwd()
    try:
        _import_body_module(module_name, module_path)
        fn, args, kwargs = pickle.loads(payload)
        _reset_state(num_threads)
        result = fn(*args, **kwargs)
        try:
            reply = ("ok", pickle.dumps(result))
        except Exception as exc:  # noqa: BLE001 - report any pickling failure to the test
            reply = ("error", f"the return value ({type(result).__name__}) is not picklable: {exc!r}")
    except BaseException as exc:  # noqa: BLE001 - a body may raise anything, even SystemExit
        if isinstance(exc, pytest.skip.Exception):
            reply = ("skip", str(getattr(exc, "msg", exc)))
        else:
            reply = ("error", traceback.format_exc())
    finally:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
    if reply[0] == "error":
        # The pool is replaced anyway; tearing groups down while peers may still be
        # inside a collective on them could hang this rank (NCCL) and hide its error.
        return reply[0], reply[1], False
    try:
        keep = _destroy_extra_groups()
    except Exception:  # noqa: BLE001 - a broken group set means this worker must be replaced
        keep = False
    return reply[0], reply[1], keep


def _worker_main(rank, world_size, backend, port, num_threads, conn, parent_pid):
    """Entry point of one spawned worker: set up the group, then serve tasks until told to stop."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        _worker_setup(rank, world_size, backend, port, num_threads)
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc(), False))
        return
    conn.send(("ready", os.getpid(), True))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            break
        conn.send(_run_task(message))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- parent side


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Pool:
    """``world_size`` spawned workers sharing one default process group."""

    def __init__(self, world_size, backend):
        self.world_size = world_size
        self.backend = backend
        self.procs = []
        self.conns = []
        self.pids = []

    def start(self, num_threads):
        ctx = multiprocessing.get_context("spawn")
        port = _free_port()
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, name=f"dist-harness-ws{self.world_size}-rank{rank}",
                args=(rank, self.world_size, self.backend, port, num_threads, child_conn, os.getpid()))
            proc.start()
            child_conn.close()  # so a dead worker shows up as EOF on our end
            self.procs.append(proc)
            self.conns.append(parent_conn)
        try:
            replies, unfinished = self.collect(POOL_START_TIMEOUT_S, grace=0.0)
        except BaseException:  # e.g. Ctrl-C while workers import torch: leave no orphans
            self.kill()
            raise
        errors = {rank: payload for rank, (kind, payload, _) in replies.items() if kind != "ready"}
        if errors or unfinished:
            self.kill()
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise DistributedTestError(
                f"could not start a {self.backend} worker pool of {self.world_size} ranks on port {port}"
                f"; ranks that did not start: {sorted(unfinished)}{detail}", errors=errors,
                unfinished=unfinished)
        self.pids = [replies[rank][1] for rank in range(self.world_size)]

    def submit(self, message):
        for conn in self.conns:
            conn.send(message)

    def collect(self, timeout, grace):
        """Wait for one reply per rank; returns (replies, unfinished ranks).

        Stops early, ``grace`` seconds after the first error, because the other
        ranks may be waiting forever in a collective with the failed one.
        """
        deadline = time.monotonic() + timeout
        replies, pending = {}, set(range(self.world_size))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            handles = {}
            for rank in pending:
                handles[self.conns[rank]] = rank
                handles[self.procs[rank].sentinel] = rank
            for handle in _wait_ready(list(handles), timeout=remaining):
                rank = handles[handle]
                if rank in pending:
                    replies[rank] = self._receive(rank)
                    pending.discard(rank)
                    if replies[rank][0] not in ("ok", "ready", "skip"):
                        deadline = min(deadline, time.monotonic() + grace)
        return replies, pending

    def _receive(self, rank):
        conn, proc = self.conns[rank], self.procs[rank]
        try:
            if conn.poll():
                return conn.recv()
        except (EOFError, OSError):
            pass
        proc.join(timeout=1.0)
        return ("error", f"worker process {proc.pid} died (exit code {proc.exitcode}) "
                         "without reporting a result", False)

    def kill(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=5.0)
        for conn in self.conns:
            conn.close()

    def shutdown(self, timeout=10.0):
        """Ask workers to leave cleanly; kill those that do not within ``timeout``."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()


def shutdown_pools():
    """Stop every worker pool (called at the end of the pytest session and at exit)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.shutdown()


atexit.register(shutdown_pools)


def _get_pool(world_size, backend, num_threads):
    key = (world_size, backend)
    pool = _pools.get(key)
    if pool is not None and all(proc.is_alive() for proc in pool.procs):
        return pool
    if pool is not None:
        _pools.pop(key).kill()
    for attempt in range(3):
        pool = _Pool(world_size, backend)
        try:
            pool.start(num_threads)
            break
        except DistributedTestError as exc:
            # The free port was taken between choosing and binding it: pick another.
            if attempt == 2 or not any("EADDRINUSE" in tb or "address already in use" in tb
                                       for tb in exc.errors.values()):
                raise
    _pools[key] = pool
    return pool


def _check_arguments(fn, world_size, args, kwargs, timeout, backend):
    if not callable(fn):
        raise TypeError(f"run_distributed: fn must be callable, got {type(fn).__name__}")
    qualname = getattr(fn, "__qualname__", "")
    if "<" in qualname:
        raise TypeError(f"run_distributed: fn must be a module-level function so the workers can "
                        f"import it by reference; {qualname!r} is a lambda or nested function")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_distributed: world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"run_distributed: args must be a tuple or list, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"run_distributed: kwargs must be a dict or None, got {type(kwargs).__name__}")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"run_distributed: timeout must be a positive number of seconds, got {timeout!r}")
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"run_distributed: backend must be one of {', '.join(SUPPORTED_BACKENDS)}, "
                         f"got {backend!r}")


def _effective_timeout(timeout):
    """Shorten ``timeout`` so the harness fails before an armed pytest-timeout does."""
    if _outer_deadline is None:
        return float(timeout), False
    remaining = _outer_deadline - time.monotonic() - OUTER_TIMEOUT_MARGIN_S
    if remaining < timeout:
        return max(remaining, 1.0), True
    return float(timeout), False


def _task_message(fn, args, kwargs, num_threads):
    module = sys.modules.get(fn.__module__)
    module_path = getattr(module, "__file__", None)
    payload = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
    return (list(sys.path), fn.__module__, module_path, payload, num_threads)


def run_distributed(fn, world_size, args=(), kwargs=None, timeout=120, backend=None, num_threads=1):
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return the per-rank results.

    Args:
        fn: module-level function; runs on every rank with the default process group
            initialised (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_SIZE``,
            ``MASTER_ADDR``, ``MASTER_PORT`` set). Seeds are reset to 0 before each call.
        world_size: number of ranks (int >= 1).
        args, kwargs: picklable arguments for ``fn``. Default ``()`` and ``None``.
        timeout: seconds all ranks have to answer (default 120); shortened to fire
            before pytest-timeout when that is armed.
        backend: ``"gloo"`` or ``"nccl"``; default from ``--dist-backend`` /
            ``$DEEPSCALE_TEST_BACKEND``, else gloo.
        num_threads: ``torch.set_num_threads`` value for the body (default 1).

    Returns:
        list of return values, indexed by rank.

    Raises:
        DistributedTestError: a rank raised (message has rank and traceback).
        DistributedTimeoutError: a rank did not answer in time (message names it).
        pytest.skip.Exception: NCCL with fewer GPUs than ranks, or a body skipped.
    """
    backend = default_backend() if backend is None else backend
    _check_arguments(fn, world_size, args, kwargs, timeout, backend)
    if backend == "nccl":
        import torch
        num_gpus = torch.cuda.device_count()
        if world_size > num_gpus:
            pytest.skip(f"needs {world_size} GPUs, found {num_gpus}")
    message = _task_message(fn, args, kwargs, num_threads)
    pool = _get_pool(world_size, backend, num_threads)
    timeout, clamped = _effective_timeout(timeout)
    try:
        pool.submit(message)
        replies, unfinished = pool.collect(timeout, grace=ERROR_GRACE_S)
    except BaseException:  # interrupted mid-body: the ranks are in an unknown state
        _pools.pop((world_size, backend), None)
        pool.kill()
        raise
    if unfinished or any(kind == "error" or not keep for kind, _, keep in replies.values()):
        _pools.pop((world_size, backend), None)
        pool.kill()
    return _results_or_raise(fn, world_size, backend, replies, unfinished, timeout, clamped)


def _results_or_raise(fn, world_size, backend, replies, unfinished, timeout, clamped):
    name = f"{fn.__module__}.{fn.__qualname__}"
    where = f"run_distributed({name}, world_size={world_size}, backend={backend})"
    errors = {rank: payload for rank, (kind, payload, _) in replies.items() if kind == "error"}
    finished = sorted(replies)
    if errors:
        first = min(errors)
        detail = "".join(f"\n--- rank {rank} traceback ---\n{text}" for rank, text in sorted(errors.items()))
        hung = (f"\nranks {sorted(unfinished)} did not finish within the {ERROR_GRACE_S} s grace period "
                "(probably waiting in a collective)") if unfinished else ""
        raise DistributedTestError(
            f"{where}: rank {first} raised (failed ranks: {sorted(errors)}){hung}{detail}",
            errors=errors, finished=finished, unfinished=unfinished)
    if unfinished:
        why = " (shortened to fire before pytest-timeout)" if clamped else ""
        raise DistributedTimeoutError(
            f"{where}: timed out after {timeout:.1f} s{why}; finished ranks: {finished}; "
            f"did not finish: ranks {sorted(unfinished)}", finished=finished, unfinished=unfinished)
    skips = [payload for kind, payload, _ in replies.values() if kind == "skip"]
    if skips:
        pytest.skip(skips[0])
    return [pickle.loads(replies[rank][1]) for rank in range(world_size)]
