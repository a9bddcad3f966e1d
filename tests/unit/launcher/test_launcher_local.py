"""The single-node ``deepscale`` CLI: real rank processes on this machine."""
import os
import signal
import socket
import subprocess
import time

import pytest

from _launcher_helpers import (ENV_SCRIPT, FAIL_SCRIPT, base_env, deepscale_cmd, free_port,
                               pid_alive, read_records, run_deepscale, wait_for, write_script)

pytestmark = pytest.mark.timeout(120)


def test_spawns_ranks_with_env_and_local_rank(tmp_path, out):
    script = write_script(tmp_path, "env.py", ENV_SCRIPT)
    port = free_port()
    result = run_deepscale(["--num_procs", 3, "--master_port", port, script, "--lr", "0.1"], base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    records = read_records(out, 3)
    for rank, rec in records.items():
        assert rec["RANK"] == rec["LOCAL_RANK"] == str(rank)
        assert (rec["WORLD_SIZE"], rec["LOCAL_SIZE"], rec["CROSS_RANK"], rec["CROSS_SIZE"]) == ("3", "3", "0", "1")
        assert (rec["MASTER_ADDR"], rec["MASTER_PORT"]) == ("127.0.0.1", str(port))
        assert rec["argv"] == [f"--local_rank={rank}", "--lr", "0.1"]
        assert rec["cwd"] == str(tmp_path) and rec["DEEPSCALE_RESTART_COUNT"] == "0"
    assert sorted(line for line in result.stdout.splitlines() if line.endswith(" ok")) == \
        ["rank 0 ok", "rank 1 ok", "rank 2 ok"]


def test_num_gpus_without_gpu_means_cpu_ranks_and_default_is_one(tmp_path, out):
    script = write_script(tmp_path, "env.py", ENV_SCRIPT)
    result = run_deepscale(["--num_gpus", 2, "--master_port", free_port(), script], base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["WORLD_SIZE"] for r in read_records(out, 2).values()] == ["2", "2"]
    for name in os.listdir(out):
        os.remove(out / name)
    result = run_deepscale(["--master_port", free_port(), script], base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["rank0.json"]


def test_failing_rank_stops_others_and_sets_exit_code(tmp_path, out):
    script = write_script(tmp_path, "fail.py", FAIL_SCRIPT)
    start = time.time()
    result = run_deepscale(["--num_procs", 3, "--master_port", free_port(), script],
                           base_env(out, FAIL_RANK=1, FAIL_CODE=5), tmp_path, timeout=60)
    assert result.returncode == 5, result.stderr
    assert time.time() - start < 30  # the others sleep for 120 s unless stopped
    assert "rank 1 (node 0, localhost) exited with code 5" in result.stderr and "boom" in result.stderr
    pids = [int(open(out / f"pid.{r}").read().split()[0]) for r in range(3)]
    assert not any(pid_alive(p) for p in pids)


# Rank 1 fails; rank 0 fails as a consequence, only after rank 1 is gone (like a peer in a collective).
COLLATERAL_SCRIPT = """
import os, sys, time
out = os.environ["TEST_OUT_DIR"]
if os.environ["RANK"] == "1":
    open(os.path.join(out, "pid1"), "w").write(str(os.getpid()))
    sys.exit(3)
while not os.path.exists(os.path.join(out, "pid1")):
    time.sleep(0.001)
pid = int(open(os.path.join(out, "pid1")).read() or 0)
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    time.sleep(0.001)
"""


def test_first_failure_in_time_is_reported_not_lowest_rank(tmp_path, out):
    script = write_script(tmp_path, "collateral.py", COLLATERAL_SCRIPT)
    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), script], base_env(out), tmp_path)
    assert result.returncode == 3, result.stderr
    assert "rank 1 (node 0, localhost) exited with code 3" in result.stderr


def test_sigint_forwarded_to_ranks(tmp_path, out):
    script = write_script(tmp_path, "wait.py", FAIL_SCRIPT)
    proc = subprocess.Popen(deepscale_cmd("--num_procs", 2, "--master_port", free_port(), script),
                            env=base_env(out), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        assert wait_for(lambda: all((out / f"pid.{r}").exists() for r in range(2)), 30)
        pids = [int(open(out / f"pid.{r}").read().split()[0]) for r in range(2)]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert not any(pid_alive(p) for p in pids)


def test_log_dir_one_file_per_rank_and_tail_from_log(tmp_path, out):
    script = write_script(tmp_path, "fail.py", "import os, sys\nprint('hello from', os.environ['RANK'])\n"
                                               "sys.exit(4 if os.environ['RANK'] == '1' else 0)\n")
    logs = tmp_path / "logs"
    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), "--log_dir", logs, script],
                           base_env(out), tmp_path)
    assert result.returncode == 4
    assert sorted(os.listdir(logs)) == ["rank0.log", "rank1.log"]
    assert (logs / "rank1.log").read_text() == "hello from 1\n"
    assert "hello from 1" in result.stderr and "hello from" not in result.stdout


# The documented restart pattern: save progress, and on DEEPSCALE_RESTART_COUNT > 0 resume from it.
RESTART_SCRIPT = """
import json, os, sys
ckpt = os.path.join(os.environ["TEST_OUT_DIR"], "ckpt%s.json" % os.environ["RANK"])
attempt = int(os.environ["DEEPSCALE_RESTART_COUNT"])
step = json.load(open(ckpt))["step"] if attempt > 0 and os.path.exists(ckpt) else 0
while step < 10:
    step += 1
    with open(ckpt + ".tmp", "w") as f:  # atomic: the launcher may kill this rank mid-write
        json.dump({"step": step}, f)
    os.replace(ckpt + ".tmp", ckpt)
    if attempt == 0 and step == 4 and os.environ["RANK"] == "1":
        sys.exit(9)
with open(os.path.join(os.environ["TEST_OUT_DIR"], "done%s" % os.environ["RANK"]), "w") as f:
    f.write("%d %d" % (attempt, step))
"""


def test_max_restarts_resumes_from_checkpoint(tmp_path, out):
    script = write_script(tmp_path, "train.py", RESTART_SCRIPT)
    failed = run_deepscale(["--num_procs", 2, "--master_port", free_port(), script], base_env(out), tmp_path)
    assert failed.returncode == 9
    for name in os.listdir(out):
        os.remove(out / name)
    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), "--max_restarts", 2, script],
                           base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "done1").read_text() == "1 10"  # finished on the second attempt
    assert "restart 1 of 2" in result.stdout + result.stderr


def test_no_python_module_and_no_local_rank(tmp_path, out):
    program = write_script(tmp_path, "prog.sh", "#!/bin/sh\necho \"$RANK:$*\" > \"$TEST_OUT_DIR/sh$RANK\"\n")
    os.chmod(program, 0o755)
    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), "--no_python", "--no_local_rank",
                            program, "a"], base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "sh1").read_text() == "1:a\n"
    write_script(tmp_path, "mymod.py", ENV_SCRIPT)
    result = run_deepscale(["--num_procs", 1, "--master_port", free_port(), "--module", "mymod", "x"],
                           base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_records(out, 1)[0]["argv"] == ["--local_rank=0", "x"]


def test_bind_cores_to_rank(tmp_path, out):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    script = write_script(tmp_path, "env.py", ENV_SCRIPT)
    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), "--bind_cores_to_rank", script],
                           base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    records = read_records(out, 2)
    per_rank = len(cores) // 2
    assert records[0]["affinity"] == cores[:per_rank] and records[1]["affinity"] == cores[per_rank:2 * per_rank]
    assert records[0]["OMP_NUM_THREADS"] == str(per_rank)


def test_port_in_use_is_a_clear_error(tmp_path, out):
    script = write_script(tmp_path, "env.py", ENV_SCRIPT)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_deepscale(["--num_procs", 2, "--master_port", port, script], base_env(out), tmp_path)
    assert result.returncode == 2
    assert f"--master_port {port} is already in use" in result.stderr
    assert os.listdir(out) == []  # no rank started


def test_bad_hostfile_line_reports_line_number(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode1 slots=2\n\nnode2 slotz=2\n")
    result = run_deepscale(["--hostfile", hostfile, "x.py"], base_env(), tmp_path)
    assert result.returncode == 2
    assert f"hostfile {hostfile} line 4" in result.stderr


def test_save_pid_files_exist_while_running(tmp_path, out):
    script = write_script(tmp_path, "wait.py", FAIL_SCRIPT)
    env = base_env(out, DEEPSCALE_PID_DIR=tmp_path)
    proc = subprocess.Popen(deepscale_cmd("--num_procs", 2, "--master_port", free_port(), "--save_pid", script),
                            env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (tmp_path / f"{proc.pid}.node0.deepscale").exists(), 30)
        assert (tmp_path / f"{proc.pid}.deepscale").read_text().strip() == str(proc.pid)
        lines = (tmp_path / f"{proc.pid}.node0.deepscale").read_text().split("\n")
        assert lines[0] == f"launcher {proc.pid}" and lines[1].startswith("rank 0 ")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not list(tmp_path.glob("*.deepscale"))


def test_launcher_works_where_torch_is_broken(tmp_path, out):
    # DESIGN: the launcher must start where torch cannot be imported (and never pay for importing it).
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this torch is broken')\n")
    script = write_script(tmp_path, "env.py", ENV_SCRIPT)
    env = base_env(out)
    env["PYTHONPATH"] = f"{broken.parent}{os.pathsep}{env['PYTHONPATH']}"
    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), script], env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["RANK"] for r in read_records(out, 2).values()] == ["0", "1"]
