"""Helpers of the integration tests: child-process environment, ports, checked runs."""
import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def shim_env(shim_dir, *extra_paths) -> dict:
    """Environment for a child process that sees deepscale from this checkout and the shim."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DISABLE_TQDM="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_CONFIG_DS_FIELDS"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(shim_dir), *map(str, extra_paths)])
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_checked(cmd, env, cwd, timeout=300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n" + proc.stdout[-4000:] + "\n" + proc.stderr[-6000:]
    return proc.stdout + proc.stderr
