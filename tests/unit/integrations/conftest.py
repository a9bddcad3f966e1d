"""Fixtures for the integration tests: the ``deepspeed`` compat shim installed into a temp dir.

The shim is installed once per session with ``pip install --no-deps --no-build-isolation
--target DIR compat/deepspeed-shim`` (no network needed when setuptools and wheel are installed;
otherwise pip's isolated build is tried); tests put DIR on PYTHONPATH of the processes they
start, so the system environment never sees a ``deepspeed`` package. Where a real DeepSpeed is
installed the tests that need the shim skip (it refuses to run next to one).
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from _hf_helpers import REPO

SHIM_SOURCE = REPO / "compat" / "deepspeed-shim"


@pytest.fixture(scope="session")
def shim_dir(tmp_path_factory):
    """A directory holding the installed ``deepspeed`` shim package and its dist-info."""
    spec = importlib.util.spec_from_file_location("_shim_guard_conftest", SHIM_SOURCE / "deepspeed" / "_guard.py")
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    found = guard.find_real_deepspeed_installs([p for p in sys.path if p])
    if found:
        pytest.skip("a real DeepSpeed is installed in this environment (" + "; ".join(found) + "); the shim "
                    "refuses to run next to it, by design")
    target = tmp_path_factory.mktemp("deepspeed_shim")
    # Build from a copy: setuptools leaves build/ and *.egg-info next to the sources it builds.
    source = tmp_path_factory.mktemp("deepspeed_shim_src") / "deepspeed-shim"
    shutil.copytree(SHIM_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
            "--target", str(target), str(source)]
    # Without build isolation first (no network); with it if this environment lacks setuptools/wheel.
    for extra in (["--no-build-isolation"], []):
        proc = subprocess.run(base[:4] + extra + base[4:], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PIP_NO_INPUT="1"))
        if proc.returncode == 0:
            return target
    pytest.fail("installing compat/deepspeed-shim failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])


