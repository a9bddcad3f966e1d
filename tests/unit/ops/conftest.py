"""Shared set-up of the op tests: one JIT cache per test session.

Every op is built at most once per session into this cache; tests that need a cold build of
their own use a separate directory. ``DEEPSCALE_OP_CACHE`` from the environment is honoured so
a developer can keep builds between runs.
"""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def op_cache_dir(tmp_path_factory):
    """The session's op cache directory (exported as DEEPSCALE_OP_CACHE)."""
    path = os.environ.get("DEEPSCALE_OP_CACHE") or str(tmp_path_factory.mktemp("op_cache"))
    previous = os.environ.get("DEEPSCALE_OP_CACHE")
    os.environ["DEEPSCALE_OP_CACHE"] = path
    yield path
    if previous is None:
        os.environ.pop("DEEPSCALE_OP_CACHE", None)
