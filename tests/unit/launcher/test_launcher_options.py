"""Runner flags, add_config_arguments, exported environment and node resources."""
import argparse

import pytest

from deepscale.launcher.arguments import build_parser, parse_args, validate_args
from deepscale.launcher.config_arguments import add_config_arguments
from deepscale.launcher.devices import detect_gpu_count, parse_core_list, split_cores, visible_devices
from deepscale.launcher.env import collect_exports, parse_env_file


def _args(*argv):
    return validate_args(build_parser().parse_args(list(argv)))


def test_deepspeed_compatible_flags_parse():
    args = _args("-H", "hf", "-i", "a:0@b", "--master_addr", "10.0.0.1", "--master_port", "1234", "--launcher",
                 "OpenMPI", "--launcher_args", "-x FOO", "--force_multi", "--no_local_rank", "--save_pid",
                 "--ssh_port", "2222", "--enable_each_rank_log", "logs", "train.py", "--lr", "1", "--num_gpus", "4")
    assert (args.hostfile, args.include, args.master_addr, args.master_port) == ("hf", "a:0@b", "10.0.0.1", 1234)
    assert (args.launcher, args.launcher_args, args.ssh_port, args.log_dir) == ("openmpi", "-x FOO", 2222, "logs")
    assert args.force_multi and args.no_local_rank and args.save_pid
    # everything after the script belongs to the script, even flags the runner knows
    assert args.user_script == "train.py" and args.user_args == ["--lr", "1", "--num_gpus", "4"]
    assert _args("--num_accelerators", "2", "t.py").num_gpus == 2
    assert _args("--num_procs", "3", "t.py").num_gpus == 3


@pytest.mark.parametrize("argv, message", [
    (["--num_gpus", "2", "--num_procs", "3", "t.py"], "--num_gpus 2 and --num_procs 3 disagree"),
    (["--num_nodes", "0", "t.py"], "--num_nodes must be a positive integer"),
    (["--num_gpus", "-3", "t.py"], "--num_gpus must be a positive integer"),
    (["--num_gpus", "2", "--include", "a", "t.py"], "cannot be combined with --include"),
    (["--module", "--no_python", "t.py"], "--module and --no_python"),
    (["--max_restarts", "-1", "t.py"], "--max_restarts must be >= 0"),
    (["--master_port", "70000", "t.py"], "--master_port must be between 1 and 65535"),
    (["--bind_core_list", "0-3", "t.py"], "--bind_core_list needs --bind_cores_to_rank"),
    ([], "missing the training script"),
])
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        _args(*argv)


def test_parse_args_turns_errors_into_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--launcher", "torque", "t.py"])
    assert exc.value.code == 2
    assert "invalid choice: 'torque'" in capsys.readouterr().err


def test_add_config_arguments_sets_both_spellings():
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.deepscale, args.deepspeed, args.deepscale_config, args.deepspeed_config) == (False, False, None, None)
    for flag in ("--deepspeed_config", "--deepscale_config"):
        args = parser.parse_args([flag, "ds.json"])
        assert args.deepspeed_config == args.deepscale_config == "ds.json"
    for flag in ("--deepspeed", "--deepscale"):
        args = parser.parse_args([flag])
        assert args.deepspeed is True and args.deepscale is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--deepscale_config", "a.json", "--deepspeed_config", "b.json"])
    with pytest.raises(TypeError, match="argparse.ArgumentParser"):
        add_config_arguments(object())


def test_exports_prefixes_and_env_files(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepscale_env").write_text("A=home\nB=home\n")
    (cwd / ".deepscale_env").write_text("# comment\nexport B=cwd value\nBARE\nUNSET_BARE\n")
    explicit = tmp_path / "explicit.env"
    explicit.write_text("C=explicit=1\n")
    environ = {"NCCL_DEBUG": "INFO", "PYTHONPATH": "/x", "OMP_NUM_THREADS": "4", "HOME": str(home),
               "CUDA_VISIBLE_DEVICES": "0", "UNRELATED": "1", "BARE": "from-env", "DEEPSCALE_ENV_FILE": str(explicit)}
    exports = collect_exports(environ, cwd=str(cwd), home=str(home))
    assert exports == {"NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "4", "PYTHONPATH": "/x", "A": "home",
                       "B": "cwd value", "BARE": "from-env", "C": "explicit=1"}
    with pytest.raises(ValueError, match="DEEPSCALE_ENV_FILE="):
        collect_exports({"DEEPSCALE_ENV_FILE": str(tmp_path / "missing")}, cwd=str(cwd), home=None)
    bad = tmp_path / "bad.env"
    bad.write_text("OK=1\n1NOT A NAME\n")
    with pytest.raises(ValueError, match="line 2"):
        parse_env_file(str(bad), {})


def test_gpu_count_and_visible_devices(monkeypatch):
    assert detect_gpu_count({"DEEPSCALE_ACCELERATOR": "cpu"}) == 0
    monkeypatch.setattr("deepscale.launcher.devices._physical_gpu_count", lambda: 8)
    assert detect_gpu_count({}) == 8
    assert detect_gpu_count({"CUDA_VISIBLE_DEVICES": "2,5"}) == 2
    assert detect_gpu_count({"CUDA_VISIBLE_DEVICES": "1,-1,3"}) == 1
    assert visible_devices([0, 2], {}) == "0,2"
    assert visible_devices([0, 1], {"CUDA_VISIBLE_DEVICES": "4,6,7"}) == "4,6"


def test_core_lists():
    assert parse_core_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    for bad in ("3-1", "a", "1,1"):
        with pytest.raises(ValueError, match="--bind_core_list"):
            parse_core_list(bad)
    assert split_cores(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot be split among 3"):
        split_cores(3, [0, 1])
