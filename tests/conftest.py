"""Session-wide test options and markers (shared by tests/unit and tests/gpu).

* ``--dist-backend {gloo,nccl}`` picks the backend of ``dist_harness.run_distributed``
  (default gloo; ``DEEPSCALE_TEST_BACKEND`` works too; the option wins).
* ``@pytest.mark.gpu`` tests are skipped with "needs CUDA" where torch sees no GPU.
* Worker pools of the distributed harness are told about pytest-timeout's timer (so
  the harness fails first, with a better message) and shut down at session end.
"""
import os
import sys

import pytest

_BACKENDS = ("gloo", "nccl")
_BACKEND_ENV = "DEEPSCALE_TEST_BACKEND"


def pytest_addoption(parser):
    parser.addoption(
        "--dist-backend", choices=_BACKENDS, default=None,
        help=f"torch.distributed backend for multi-process tests (default: ${_BACKEND_ENV} or gloo); "
             "with nccl each rank uses one GPU and tests needing more GPUs than present are skipped")


def pytest_configure(config):
    backend = config.getoption("--dist-backend")
    if backend is not None:
        # The harness reads the environment, which also reaches its spawned workers.
        os.environ[_BACKEND_ENV] = backend
    value = os.environ.get(_BACKEND_ENV, "gloo").strip().lower() or "gloo"
    if value not in _BACKENDS:
        raise pytest.UsageError(f"{_BACKEND_ENV}={value!r} is not supported; allowed values: "
                                f"{', '.join(_BACKENDS)}")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # avoid importing torch for runs that have no GPU tests
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


def _harness():
    # Only act on the harness if some test imported it; never import it here.
    return sys.modules.get("dist_harness")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    harness = _harness()
    if harness is not None:
        harness.set_outer_deadline(settings.timeout)
    return None  # let pytest-timeout arm its own timer as usual


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_cancel_timer(item):
    harness = _harness()
    if harness is not None:
        harness.set_outer_deadline(None)
    return None


def pytest_sessionfinish(session, exitstatus):
    harness = _harness()
    if harness is not None:
        harness.shutdown_pools()
