"""Fixtures for the integration tests: the ``deepspeed`` compat shim installed into a temp dir.

The shim is installed once per session with ``pip install --no-deps --no-build-isolation
--target DIR compat/deepspeed-shim`` (no network needed: setuptools comes from the running
environment); tests put DIR on PYTHONPATH of the processes they start, so the system
environment never sees a ``deepspeed`` package.
"""
import os
import subprocess
import sys

import pytest

from _hf_helpers import REPO

SHIM_SOURCE = REPO / "compat" / "deepspeed-shim"


@pytest.fixture(scope="session")
def shim_dir(tmp_path_factory):
    """A directory holding the installed ``deepspeed`` shim package and its dist-info."""
    target = tmp_path_factory.mktemp("deepspeed_shim")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), str(SHIM_SOURCE)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PIP_NO_INPUT="1"))
    if proc.returncode != 0:
        pytest.fail("installing compat/deepspeed-shim failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
    return target


