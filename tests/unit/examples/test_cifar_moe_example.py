"""The CIFAR MoE example (DeepSpeed tutorial interface) under the deepscale launcher."""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "examples" / "cifar" / "cifar10_moe.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cifar_moe_ep2_top2_residual_four_ranks_zero3():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "deepscale.launcher", "--num_procs", "4", "--master_port", str(_free_port()),
           str(SCRIPT), "--moe", "--ep-world-size", "2", "--num-experts", "4", "--top-k", "2", "--mlp-type",
           "residual", "--moe-param-group", "--stage", "3", "--steps", "3", "--log-interval", "1", "--synthetic",
           "--num-samples", "256"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 3 steps" in proc.stdout
    assert "step 3 loss" in proc.stdout
