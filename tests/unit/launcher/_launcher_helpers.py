"""Helpers for the launcher tests: run the CLI, rank scripts, a private sshd and Slurm cluster.

Everything listens on 127.0.0.0/8 only. 127.0.0.2 and 127.0.0.3 play two nodes; both are
this machine, which is why the per-node launchers get their node rank explicitly.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
NODES = ("127.0.0.2", "127.0.0.3")
SSH_CLIENT_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"

# A rank that records its view of the job (env, argv, affinity, process ancestry) as JSON.
ENV_SCRIPT = textwrap.dedent("""
    import json, os, sys
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
            "CROSS_SIZE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "DEEPSCALE_RESTART_COUNT", "FROM_ENV_FILE",
            "NCCL_DEBUG")
    out = os.environ["TEST_OUT_DIR"]
    record = {k: os.environ.get(k) for k in keys}
    record.update(argv=sys.argv[1:], cwd=os.getcwd(), affinity=sorted(os.sched_getaffinity(0)), pid=os.getpid())
    with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(record, f)
    print("rank %s ok" % os.environ["RANK"], flush=True)
""")

# The ancestry of the rank's launcher (to prove it ran under sshd or slurmstepd), as JSON-able list.
_CHAIN = """
def launcher_chain():
    chain, pid = [], os.getppid()
    while pid > 1:
        with open("/proc/%d/comm" % pid) as f:
            chain.append(f.read().strip())
        with open("/proc/%d/stat" % pid) as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return chain


def record(rank, world, total):
    rec = {"rank": rank, "world": world, "sum": total, "chain": launcher_chain(),
           "env_rank": int(os.environ["RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]),
           "cross_rank": int(os.environ["CROSS_RANK"]), "cross_size": int(os.environ["CROSS_SIZE"]),
           "local_size": int(os.environ["LOCAL_SIZE"])}
    with open(os.path.join(os.environ["TEST_OUT_DIR"], "rank%d.json" % rank), "w") as f:
        json.dump(rec, f)
"""

# All-reduce over torch.distributed (gloo, env://).
ALLREDUCE_SCRIPT = "import json, os\n" + _CHAIN + textwrap.dedent("""
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    record(dist.get_rank(), dist.get_world_size(), value.item())
    dist.barrier()
    dist.destroy_process_group()
""")

# Every rank records "pid launcher_pid"; FAIL_RANK exits FAIL_CODE once all ranks are up, the others wait.
FAIL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    out, rank = os.environ["TEST_OUT_DIR"], int(os.environ["RANK"])
    with open(os.path.join(out, "pid.%d.tmp" % rank), "w") as f:
        f.write("%d %d" % (os.getpid(), os.getppid()))
    os.replace(os.path.join(out, "pid.%d.tmp" % rank), os.path.join(out, "pid.%d" % rank))
    fail_rank = int(os.environ.get("FAIL_RANK", "-1"))
    if rank == fail_rank:
        deadline = time.time() + 60
        while time.time() < deadline and len([n for n in os.listdir(out) if n.startswith("pid.") and
                                              not n.endswith(".tmp")]) < int(os.environ["WORLD_SIZE"]):
            time.sleep(0.05)
        print("rank %d gives up: boom" % rank, file=sys.stderr, flush=True)
        with open(os.path.join(out, "failed_at"), "w") as f:
            f.write(repr(time.time()))
        sys.exit(int(os.environ.get("FAIL_CODE", "3")))
    time.sleep(120)
""")


def write_script(folder, name, text):
    path = os.path.join(str(folder), name)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def base_env(out_dir=None, **extra):
    """Environment for the runner: the repo importable, no real GPU, test output folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["DEEPSCALE_ACCELERATOR"] = "cpu"
    env.pop("DEEPSCALE_ENV_FILE", None)
    if out_dir is not None:
        env["TEST_OUT_DIR"] = str(out_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def deepscale_cmd(*args):
    return [sys.executable, "-m", "deepscale.launcher"] + [str(a) for a in args]


def run_deepscale(args, env, cwd, timeout=120):
    """Run the CLI to completion; returns the CompletedProcess (text)."""
    return subprocess.run(deepscale_cmd(*args), env=env, cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def read_records(out_dir, world_size):
    records = {}
    for rank in range(world_size):
        with open(os.path.join(str(out_dir), f"rank{rank}.json")) as handle:
            records[rank] = json.load(handle)
    return records


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it runs nothing and holds no resources but its slot.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def write_hostfile(folder, hosts, slots=2, name="hostfile"):
    path = os.path.join(str(folder), name)
    with open(path, "w") as handle:
        handle.write("# two loopback nodes\n\n" + "".join(f"{h} slots={slots}\n" for h in hosts))
    return path


def require_programs(*programs):
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: openssh-server openssh-client pdsh openmpi-bin mpich "
                    f"slurm-wlm)")


def stop_process_group(proc, timeout=5.0):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
