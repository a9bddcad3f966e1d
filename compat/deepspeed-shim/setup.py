"""Build of the deepspeed compatibility shim; refuses to replace a real DeepSpeed installation.

The refusal lives here (and again at import time, in deepspeed/__init__.py) because the shim's
distribution name is ``deepspeed``: pip would otherwise uninstall a real DeepSpeed silently.
Set ``DEEPSCALE_SHIM_REPLACE_DEEPSPEED=1`` to replace it on purpose.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed"))
from _guard import find_real_deepspeed_installs  # noqa: E402

if os.environ.get("DEEPSCALE_SHIM_REPLACE_DEEPSPEED") != "1":
    found = find_real_deepspeed_installs()
    if found:
        sys.exit("refusing to build the deepscale 'deepspeed' compatibility shim: a real DeepSpeed is installed in "
                 "this environment (" + "; ".join(found) + "). Installing the shim would replace it. Uninstall it "
                 "first (pip uninstall deepspeed) or use a separate virtual environment; to replace it on purpose "
                 "set DEEPSCALE_SHIM_REPLACE_DEEPSPEED=1.")

setup()
