"""Helpers for the op tests (name kept distinct: tests/unit has no packages)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]

# Tests that build an op (or whose checks come after the compiler check) need the C++ compiler
# torch's extension machinery calls; without one (a bare machine) they skip with the reason.
_CXX = os.environ.get("CXX", "c++")
needs_cxx = pytest.mark.skipif(shutil.which(_CXX) is None,
                               reason=f"needs a C++ compiler: '{_CXX}' is not on PATH (apt-get install g++)")


def run_python(code, env_updates=None, timeout=300):
    """Run ``code`` in a fresh interpreter at the repo root; returns the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_updates or {})
    return subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=env, capture_output=True, text=True,
                          timeout=timeout)
