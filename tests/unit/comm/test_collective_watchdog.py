"""The collective watchdog: every deepscale.comm collective is watched; a rank that waits too long
reports the collective, the step and what the other ranks last did, or aborts the job."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed

JOB = Path(__file__).with_name("_watchdog_job.py")
REPO = Path(__file__).resolve().parents[3]


def _start_job(mode: str):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env.pop("DEEPSCALE_WATCHDOG_TIMEOUT", None)
        env.pop("DEEPSCALE_WATCHDOG_ACTION", None)
        procs.append(subprocess.Popen([sys.executable, str(JOB), mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def test_a_rank_that_skips_a_collective_is_reported_with_the_collective_step_and_peer():
    procs = _start_job("log")
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    line = next(x for x in outs[0][0].splitlines() if x.startswith("REPORTS "))
    reports = json.loads(line[len("REPORTS "):])
    assert len(reports) == 1, reports
    report = reports[0]
    for part in ("rank 0 has waited", "all_reduce of 4 float32 elements (gradient all-reduce) at step 2",
                 "rank 1: last issued all_reduce of 4 float32 elements (gradient all-reduce) at step 1"):
        assert part in report, report
    assert '[]' in outs[1][0], outs[1]  # rank 1 never waited long


def test_abort_mode_ends_the_job_within_the_timeout():
    procs = _start_job("abort")
    try:
        out0, err0 = procs[0].communicate(timeout=100)
        ended = time.time()
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 75, err0
    assert "aborting rank 0" in err0 and "all_reduce" in err0 and "at step 2" in err0, err0
    assert "rank 1: last issued all_reduce" in err0, err0
    waiting_since = float(out0.split("WAITING ")[1].split()[0])
    assert ended - waiting_since < 15, ended - waiting_since  # the 1.5 s timeout plus a loaded machine


class _SlowWork:
    def __init__(self, seconds):
        self.seconds = seconds

    def wait(self):
        time.sleep(self.seconds)
        return True


def test_async_waits_are_watched_and_labelled():
    from deepscale.comm.watchdog import CollectiveWatchdog, WatchedWork
    store = torch.distributed.HashStore()
    peer = CollectiveWatchdog(timeout_s=10, rank=1, world_size=2, store=store)
    peer.issued("reduce_scatter_tensor", torch.zeros(3))
    peer._publish()
    watchdog = CollectiveWatchdog(timeout_s=0.2, rank=0, world_size=2, store=store, poll_s=0.05)
    watchdog.step = 7
    with watchdog.label("ZeRO-3 all_gather of parameter group 5: blocks.1.attn"):
        record = watchdog.issued("broadcast", torch.zeros(768))
    WatchedWork(_SlowWork(0.6), record, watchdog).wait()
    WatchedWork(_SlowWork(0.0), watchdog.issued("reduce"), watchdog).wait()
    watchdog.close()
    assert len(watchdog.reports) == 1, watchdog.reports
    report = watchdog.reports[0]
    for part in ("rank 0", "broadcast of 768 float32 elements", "parameter group 5: blocks.1.attn", "step 7",
                 "rank 1: last issued reduce_scatter_tensor of 3 float32 elements"):
        assert part in report, report


def test_watchdog_can_be_disabled_and_rejects_bad_settings(monkeypatch):
    from deepscale.comm.watchdog import CollectiveWatchdog, settings_from_env
    watchdog = CollectiveWatchdog(timeout_s=0)
    with watchdog.waiting(watchdog.issued("barrier")):
        time.sleep(0.05)
    assert not watchdog.enabled and watchdog._thread is None and watchdog.reports == []
    with pytest.raises(ValueError, match="collective_watchdog.action"):
        CollectiveWatchdog(action="explode")
    monkeypatch.setenv("DEEPSCALE_WATCHDOG_TIMEOUT", "12")
    monkeypatch.setenv("DEEPSCALE_WATCHDOG_ACTION", "abort")
    assert settings_from_env(300.0, "log") == (12.0, "abort")
    monkeypatch.setenv("DEEPSCALE_WATCHDOG_ACTION", "panic")
    with pytest.raises(ValueError, match="DEEPSCALE_WATCHDOG_ACTION"):
        settings_from_env(300.0, "log")


def _every_collective_is_watched():
    import deepscale.comm as dist
    watchdog = dist.configure_watchdog(timeout_s=60)
    t = torch.ones(2)
    calls = {
        "barrier": lambda: dist.barrier(),
        "all_reduce": lambda: dist.all_reduce(t),
        "reduce": lambda: dist.reduce(t, 0),
        "broadcast": lambda: dist.broadcast(t, 0),
        "all_gather": lambda: dist.all_gather([torch.empty(2)], t),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(torch.empty(2), t),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(torch.empty(2), t),
        "all_gather_object": lambda: dist.all_gather_object([None], 1),
        "broadcast_object_list": lambda: dist.broadcast_object_list([1], 0),
        "gather": lambda: dist.gather(t, [torch.empty(2)], 0),
        "scatter": lambda: dist.scatter(torch.empty(2), [t], 0),
    }
    seen = {}
    for name, call in calls.items():
        watchdog.last = None
        call()
        seen[name] = watchdog.last[0] if watchdog.last else None
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    return seen, type(work).__name__, work.is_completed()


def test_every_collective_wrapper_registers_with_the_watchdog():
    seen, work_type, completed = run_distributed(_every_collective_is_watched, 1)[0]
    assert seen == {name: name for name in seen}, seen
    assert work_type == "WatchedWork" and completed
