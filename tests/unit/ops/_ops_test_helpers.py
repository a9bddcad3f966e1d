"""Helpers for the op tests (name kept distinct: tests/unit has no packages)."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_python(code, env_updates=None, timeout=300):
    """Run ``code`` in a fresh interpreter at the repo root; returns the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_updates or {})
    return subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=env, capture_output=True, text=True,
                          timeout=timeout)
