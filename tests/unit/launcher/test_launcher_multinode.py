"""Real multi-node jobs on loopback: 127.0.0.2 and 127.0.0.3 are two nodes reached through a
test sshd (ssh, pdsh, OpenMPI, MPICH) or a local Slurm cluster.

Every 2x2 all-reduce job (pdsh, ssh, OpenMPI, MPICH, Slurm) runs torch.distributed on gloo, so
the variables each launcher sets are checked by the library that consumes them.
"""
import os
import signal
import subprocess
import time

import pytest

from _launcher_cluster import slurm_cluster, sshd_server  # noqa: F401 (fixtures)
from _launcher_helpers import (ALLREDUCE_SCRIPT, FAIL_SCRIPT, NODES, base_env,
                               deepscale_cmd, free_port, pid_alive, read_records, require_programs, run_deepscale,
                               wait_for, write_hostfile, write_script)

pytestmark = pytest.mark.timeout(180)

PROGRAMS = {"pdsh": ("pdsh",), "ssh": ("ssh",), "openmpi": ("mpirun.openmpi",), "mpich": ("mpirun.mpich",)}


def _job_files(tmp_path, script_text, **rank_env):
    """The script, and a ./.deepscale_env that carries the test's variables to the ranks on every node
    (variables without a known prefix such as TEST_OUT_DIR are not exported otherwise)."""
    out = tmp_path / "out"
    out.mkdir()
    rank_env["TEST_OUT_DIR"] = out
    (tmp_path / ".deepscale_env").write_text("".join(f"{k}={v}\n" for k, v in rank_env.items()))
    return write_script(tmp_path, "job.py", script_text), out


def _job(launcher, sshd, tmp_path, script_text, **rank_env):
    """Flags and environment for a 2-node x 2-rank job through ``launcher``; each launcher gets the
    test key through its own mechanism (ssh: --launcher_args, pdsh: PDSH_SSH_ARGS_APPEND, MPI: DEEPSCALE_SSH_ARGS)."""
    require_programs(*PROGRAMS[launcher])
    script, out = _job_files(tmp_path, script_text, **rank_env)
    env_extra = {}
    args = ["--hostfile", write_hostfile(tmp_path, NODES), "--launcher", launcher, "--ssh_port", sshd.port,
            "--master_port", free_port()]
    if launcher == "ssh":
        args += ["--launcher_args", sshd.client_options]
    elif launcher == "pdsh":
        env_extra["PDSH_SSH_ARGS_APPEND"] = sshd.client_options
    else:
        env_extra["DEEPSCALE_SSH_ARGS"] = sshd.client_options
    return args + [script], base_env(None, **env_extra), out


def _check_allreduce(out, through):
    records = read_records(out, 4)
    for rank, rec in records.items():
        assert rec["rank"] == rec["env_rank"] == rank
        assert rec["world"] == 4 and rec["sum"] == 1 + 2 + 3 + 4
        assert (rec["cross_rank"], rec["local_rank"]) == divmod(rank, 2)
        assert rec["local_size"] == 2 and rec["cross_size"] == 2
        assert through in rec["chain"], rec["chain"]  # the node launcher really ran under sshd/slurmstepd


@pytest.mark.parametrize("launcher, script", [("pdsh", ALLREDUCE_SCRIPT), ("ssh", ALLREDUCE_SCRIPT),
                                              ("openmpi", ALLREDUCE_SCRIPT), ("mpich", ALLREDUCE_SCRIPT)],
                         ids=["pdsh-torch", "ssh-torch", "openmpi-torch", "mpich-torch"])
def test_two_node_allreduce(launcher, script, sshd_server, tmp_path):
    if script is ALLREDUCE_SCRIPT:
        pytest.importorskip("torch")
    args, env, out = _job(launcher, sshd_server, tmp_path, script)
    result = run_deepscale(args, env, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    _check_allreduce(out, "sshd")


def _rank_and_launcher_pids(out, world_size):
    pids = []
    for rank in range(world_size):
        with open(os.path.join(str(out), f"pid.{rank}")) as handle:
            pids.extend(int(p) for p in handle.read().split())
    return pids


@pytest.mark.parametrize("launcher", ["pdsh", "ssh", "openmpi", "mpich"])
def test_rank_failure_stops_every_node(launcher, sshd_server, tmp_path):
    # Rank 3 (node 1) exits 3 once all ranks are up; ranks 0-2 would sleep for two minutes.
    args, env, out = _job(launcher, sshd_server, tmp_path, FAIL_SCRIPT, FAIL_RANK=3, FAIL_CODE=3)
    result = run_deepscale(args, env, tmp_path, timeout=60)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "rank 3 (node 1, 127.0.0.3) exited with code 3" in result.stderr
    assert "boom" in result.stderr  # the tail of the failing rank's output
    with open(out / "failed_at") as handle:
        failed_at = float(handle.read())
    pids = _rank_and_launcher_pids(out, 4)
    remaining = max(0.0, failed_at + 10.0 - time.time())
    assert wait_for(lambda: not any(pid_alive(p) for p in pids), remaining), \
        f"still running 10 s after the failure: {[p for p in pids if pid_alive(p)]}"


@pytest.mark.parametrize("launcher", ["pdsh", "ssh"])
def test_sigint_stops_all_ranks(launcher, sshd_server, tmp_path):
    args, env, out = _job(launcher, sshd_server, tmp_path, FAIL_SCRIPT)
    proc = subprocess.Popen(deepscale_cmd(*args), env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert wait_for(lambda: all((out / f"pid.{r}").exists() for r in range(4)), 60), "ranks did not start"
        pids = _rank_and_launcher_pids(out, 4)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert wait_for(lambda: not any(pid_alive(p) for p in pids), 10), [p for p in pids if pid_alive(p)]


def test_killed_runner_leaves_no_ranks(sshd_server, tmp_path):
    # SIGKILL cannot be forwarded: the node launchers notice the lost controller connection themselves.
    args, env, out = _job("ssh", sshd_server, tmp_path, FAIL_SCRIPT)
    proc = subprocess.Popen(deepscale_cmd(*args), env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: all((out / f"pid.{r}").exists() for r in range(4)), 60), "ranks did not start"
        pids = _rank_and_launcher_pids(out, 4)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: not any(pid_alive(p) for p in pids), 10), [p for p in pids if pid_alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner's ssh clients, if any are left
        except ProcessLookupError:
            pass


def test_slurm_two_node_allreduce(slurm_cluster, tmp_path):
    pytest.importorskip("torch")
    script, out = _job_files(tmp_path, ALLREDUCE_SCRIPT)
    hostfile = write_hostfile(tmp_path, slurm_cluster.nodes)
    # Slurm node names do not resolve; rank 0's address is given explicitly.
    args = ["--hostfile", hostfile, "--launcher", "slurm", "--master_addr", NODES[0], "--master_port", free_port(),
            script]
    result = run_deepscale(args, base_env(None, SLURM_CONF=slurm_cluster.conf), tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    _check_allreduce(out, "slurmstepd")


def test_slurm_rank_failure(slurm_cluster, tmp_path):
    script, out = _job_files(tmp_path, FAIL_SCRIPT, FAIL_RANK=2, FAIL_CODE=7)
    args = ["--hostfile", write_hostfile(tmp_path, slurm_cluster.nodes), "--launcher", "slurm",
            "--master_addr", NODES[0], "--master_port", free_port(), script]
    env = base_env(None, SLURM_CONF=slurm_cluster.conf)
    result = run_deepscale(args, env, tmp_path, timeout=60)
    assert result.returncode == 7, result.stderr[-3000:]
    pids = _rank_and_launcher_pids(out, 4)
    assert wait_for(lambda: not any(pid_alive(p) for p in pids), 10)


RESTART_SCRIPT = """
import os, sys
attempt, rank = os.environ["DEEPSCALE_RESTART_COUNT"], os.environ["RANK"]
print("attempt %s rank %s" % (attempt, rank), flush=True)
with open(os.path.join(os.environ["TEST_OUT_DIR"], "attempt%s.rank%s" % (attempt, rank)), "w") as f:
    f.write(os.environ["CROSS_RANK"])
sys.exit(6 if attempt == "0" and rank == "3" else 0)
"""


def test_restart_whole_job_with_per_rank_logs(sshd_server, tmp_path):
    args, env, out = _job("pdsh", sshd_server, tmp_path, RESTART_SCRIPT)
    logs = tmp_path / "logs"
    result = run_deepscale(["--max_restarts", 1, "--log_dir", logs] + args, env, tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {f"attempt1.rank{r}" for r in range(4)}
    assert (out / "attempt1.rank3").read_text() == "1"
    assert sorted(os.listdir(logs)) == [f"rank{r}.log" for r in range(4)]
    # one log per rank, appended across restarts
    assert (logs / "rank3.log").read_text() == "attempt 0 rank 3\nattempt 1 rank 3\n"
    assert "rank 3 (node 1, 127.0.0.3) exited with code 6" in result.stderr
