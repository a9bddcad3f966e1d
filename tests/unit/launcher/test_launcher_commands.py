"""What the runner would run: backend commands, --dry_run output, report dispatch, node ranks."""
import argparse
import os
import shlex
import sys
import types

import pytest

from deepscale.launcher import runner
from deepscale.launcher.launch import build_parser as launch_parser
from deepscale.launcher.launch import resolve_node_rank
from deepscale.launcher.multinode_runner import JobLaunch, get_runner
from deepscale.launcher.threads import usable_cores
from deepscale.launcher.world import WorldInfo

WORLD = WorldInfo.from_resources({"node-a": [0, 1], "node-b": [0, 1]})


def _job(**kwargs):
    defaults = dict(world=WORLD, master_addr="node-a", master_port=29500,
                    node_args=["--controller=10.0.0.1:4000", "train.py", "--note", "100%"],
                    exports={"NCCL_DEBUG": "INFO", "MY_VAR": "a b"}, launcher_args=[], ssh_port=None,
                    cwd="/shared/work dir", python="/opt/py/bin/python")
    defaults.update(kwargs)
    return JobLaunch(**defaults)


def test_pdsh_command_substitutes_node_rank_and_escapes_percent(monkeypatch):
    monkeypatch.setenv("DEEPSCALE_SSH_ARGS", "-i /k")
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", "-o A=b")
    (transport,) = get_runner("pdsh", _job(ssh_port=2222)).transports("pdsh")
    assert transport.argv[:6] == ["pdsh", "-S", "-f", "1024", "-w", "node-a,node-b"]
    assert transport.env == {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": "-o A=b -p 2222 -i /k"}
    remote = transport.argv[-1]
    assert "--node_rank=%n --node_host=%h" in remote and "100%%" in remote
    assert remote.startswith("cd '/shared/work dir' && export NCCL_DEBUG=INFO MY_VAR='a b' && exec /opt/py/bin/python")


def test_ssh_command_per_node():
    transports = get_runner("ssh", _job(ssh_port=2222, launcher_args=["-o", "X=1"])).transports("ssh")
    assert [t.node_ranks for t in transports] == [[0], [1]]
    argv = transports[1].argv
    assert argv[:6] == ["ssh", "-p", "2222", "-o", "X=1", "node-b"]
    remote = shlex.split(argv[6])
    assert "--node_rank=1" in remote and remote[-3:] == ["train.py", "--note", "100%"]
    assert any(a.startswith("--world_info=") for a in remote)


def test_openmpi_command(monkeypatch):
    monkeypatch.setenv("DEEPSCALE_SSH_ARGS", "-i /k")
    (transport,) = get_runner("openmpi", _job(ssh_port=2222)).transports("mpirun.openmpi")
    argv = transport.argv
    assert argv[:7] == ["mpirun.openmpi", "-n", "2", "--host", "node-a:1,node-b:1", "--map-by", "node"]
    assert "--bind-to" in argv and argv[argv.index("--bind-to") + 1] == "none"
    assert argv[argv.index("plm_rsh_args") + 1] == "-p 2222 -i /k"
    assert "MY_VAR=a b" in argv and "--node_rank_env=OMPI_COMM_WORLD_RANK" in argv
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)


def test_mpich_command_uses_ssh_wrapper(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSCALE_SSH_ARGS", "-i /k")
    (transport,) = get_runner("mpich", _job(ssh_port=2222)).transports("mpirun.mpich")
    argv = transport.argv
    assert argv[:7] == ["mpirun.mpich", "-n", "2", "-ppn", "1", "-hosts", "node-a,node-b"]
    wrapper = argv[argv.index("-launcher-exec") + 1]
    assert transport.files[wrapper] == '#!/bin/sh\nexec ssh -p 2222 -i /k "$@"\n'
    assert argv[argv.index("-genv") + 1: argv.index("-genv") + 3] == ["NCCL_DEBUG", "INFO"]
    assert "--node_rank_env=PMI_RANK" in argv


def test_generated_srun_command():
    # Checked even where no Slurm cluster can be started (the live test is in test_launcher_multinode.py).
    (transport,) = get_runner("slurm", _job()).transports("srun")
    argv = transport.argv
    assert argv[:8] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=node-a,node-b",
                       "--chdir=/shared/work dir", "--export=ALL", "--cpu-bind=none"]
    assert argv[8:12] == ["/opt/py/bin/python", "-u", "-m", "deepscale.launcher.launch"]
    assert "--node_rank_env=SLURMD_NODENAME" in argv
    assert transport.env == {"NCCL_DEBUG": "INFO", "MY_VAR": "a b"}  # srun passes its environment on


def test_missing_program_names_the_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    for name, package in (("pdsh", "pdsh"), ("openmpi", "openmpi-bin"), ("mpich", "mpich"), ("slurm", "slurm-client"),
                          ("ssh", "openssh-client")):
        with pytest.raises(RuntimeError, match=f"--launcher {name} needs .* install the '{package}' package"):
            get_runner(name, _job()).check_installed()
    with pytest.raises(ValueError, match="allowed values"):
        get_runner("torque", _job())


def _write_hostfile(tmp_path):
    path = tmp_path / "hf"
    path.write_text("node-a slots=2\nnode-b slots=2\n")
    return str(path)


def test_dry_run_prints_each_node_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = runner.main(["--hostfile", _write_hostfile(tmp_path), "--launcher", "ssh", "--dry_run", "t.py", "--x"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# deepscale dry run: 2 node(s), 4 rank(s), --launcher ssh; master node-a:29500")
    assert lines[1].startswith("ssh node-a ") and lines[2].startswith("ssh node-b ")
    assert lines[3].startswith("# node 0 (node-a) runs: cd ") and "--node_rank=0" in lines[3]
    assert "--node_rank=1" in lines[4] and lines[4].endswith("t.py --x")


def test_dry_run_single_node(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "t.py").write_text("")
    assert runner.main(["--num_procs", "2", "--master_port", "1234", "--dry_run", "t.py", "a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0] == "# deepscale dry run: 1 node (this host, node 0), 2 rank(s)"
    assert lines[2].startswith("RANK=1 LOCAL_RANK=1 WORLD_SIZE=2 LOCAL_SIZE=2 ")
    assert "MASTER_ADDR=127.0.0.1 MASTER_PORT=1234" in lines[2]
    assert f" OMP_NUM_THREADS={max(1, usable_cores() // 2)} " in lines[2]  # the default the ranks would get
    assert lines[2].endswith(f"{sys.executable} -u t.py --local_rank=1 a")


def test_plan_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert runner.main(["--hostfile", str(tmp_path / "nope"), "t.py"]) == 2
    assert "--hostfile" in capsys.readouterr().err
    if not os.path.exists("/job/hostfile"):
        assert runner.main(["--num_nodes", "2", "t.py"]) == 2
        assert "--num_nodes 2 needs a hostfile" in capsys.readouterr().err
    assert runner.main(["--num_procs", "1", "missing.py"]) == 2
    assert "the training script 'missing.py' does not exist" in capsys.readouterr().err
    assert runner.main(["--hostfile", _write_hostfile(tmp_path), "--include", "node-c", "t.py"]) == 2
    assert "unknown host 'node-c'" in capsys.readouterr().err


def test_report_is_dispatched_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("deepscale.env_report")

    def fake_main():
        seen["argv"] = list(sys.argv)
        return 7

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "deepscale.env_report", fake)
    assert runner.main(["report", "--hide_operator_status"]) == 7
    assert seen["argv"] == ["deepscale report", "--hide_operator_status"]


def _launch_args(*extra):
    return launch_parser().parse_args(["--world_info=x", "--master_addr=a", "--master_port=1", *extra, "s.py"])


def test_node_rank_sources():
    assert resolve_node_rank(_launch_args("--node_rank=1"), WORLD, {}) == 1
    # pdsh: the substituted host name wins over a position that does not match it
    assert resolve_node_rank(_launch_args("--node_rank=0", "--node_host=node-b"), WORLD, {}) == 1
    args = _launch_args("--node_rank_env=OMPI_COMM_WORLD_RANK")
    assert resolve_node_rank(args, WORLD, {"OMPI_COMM_WORLD_RANK": "1"}) == 1
    args = _launch_args("--node_rank_env=SLURMD_NODENAME")
    assert resolve_node_rank(args, WORLD, {"SLURMD_NODENAME": "node-b"}) == 1
    with pytest.raises(ValueError, match="not one of the job's hosts"):
        resolve_node_rank(args, WORLD, {"SLURMD_NODENAME": "node-z"})
    with pytest.raises(ValueError, match="is not set on this node"):
        resolve_node_rank(_launch_args("--node_rank_env=PMI_RANK"), WORLD, {})
    with pytest.raises(ValueError, match="out of range"):
        resolve_node_rank(_launch_args("--node_rank=2"), WORLD, {})


def test_node_launcher_flags_follow_runner_flags(tmp_path):
    args = argparse.Namespace(no_python=False, module=True, no_local_rank=True, bind_cores_to_rank=True,
                              rank_prefix=True, bind_core_list="0-3", log_dir="/logs", save_pid=False, user_script="pkg.train",
                              user_args=["--a", "1"])
    plan = types.SimpleNamespace(args=args)
    flags = runner.node_launcher_args(plan, 2, "h:1", "tok")
    assert flags == ["--controller=h:1", "--job_token=tok", "--restart_count=2", "--module", "--no_local_rank",
                     "--bind_cores_to_rank", "--rank_prefix", "--bind_core_list=0-3", "--log_dir=/logs", "pkg.train", "--a", "1"]
    parsed = launch_parser().parse_args(["--world_info=x", "--master_addr=a", "--master_port=1"] + flags)
    assert parsed.module and parsed.no_local_rank and parsed.user_args == ["--a", "1"]


def test_slurm_allocation_without_hostfile(tmp_path, monkeypatch, capsys):
    if os.path.exists("/job/hostfile"):
        pytest.skip("a real /job/hostfile exists here")
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.chdir(tmp_path)
    assert runner.main(["--launcher", "slurm", "--dry_run", "t.py"]) == 0
    out = capsys.readouterr().out
    assert "2 node(s), 8 rank(s), --launcher slurm; master gpu07:29500" in out
    assert "--nodelist=gpu07,gpu08" in out


def test_no_ssh_runs_only_this_nodes_ranks(tmp_path, monkeypatch, capsys):
    # DeepSpeed's "run deepscale on every node yourself" mode: node 1 runs global ranks 2 and 3.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.py").write_text("")
    argv = ["--hostfile", _write_hostfile(tmp_path), "--no_ssh", "--node_rank", "1", "--dry_run", "t.py"]
    assert runner.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# deepscale dry run: 1 node (this host, node 1), 2 rank(s)"
    assert lines[1].startswith("RANK=2 LOCAL_RANK=0 WORLD_SIZE=4 LOCAL_SIZE=2 LOCAL_WORLD_SIZE=2 CROSS_RANK=1 ")
    assert "MASTER_ADDR=node-a " in lines[1] and lines[2].startswith("RANK=3 LOCAL_RANK=1 ")
    assert runner.main(["--hostfile", _write_hostfile(tmp_path), "--no_ssh", "--node_rank", "2", "t.py"]) == 2
    assert "node_rank 2 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--no_ssh", "t.py"])
    assert "--no_ssh needs --node_rank" in capsys.readouterr().err
