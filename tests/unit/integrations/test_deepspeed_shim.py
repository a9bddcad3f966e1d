"""The ``deepspeed`` compatibility shim: install, aliasing, version, and the refusal to sit next to
a real DeepSpeed."""
import json
import re
import subprocess
import sys
import textwrap
from importlib import util as importlib_util

import pytest

from _hf_helpers import REPO, shim_env

SHIM = REPO / "compat" / "deepspeed-shim"

_PROBE = textwrap.dedent("""
    import importlib.metadata, json, sys
    import deepspeed, deepscale
    import deepspeed.runtime.engine, deepscale.runtime.engine
    from deepspeed.runtime.zero import partition_parameters as pp
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
    from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
    from deepspeed.utils import groups, logger, zero_to_fp32
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher.runner import DEEPSPEED_ENVIRONMENT_NAME
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed import comm as dist
    out = {
        "version": deepspeed.__version__,
        "metadata_version": importlib.metadata.version("deepspeed"),
        "same_module": deepspeed.runtime.engine is deepscale.runtime.engine,
        "module_name": deepspeed.runtime.engine.__name__,
        "engine_alias": deepspeed.DeepSpeedEngine is deepscale.runtime.engine.Engine,
        "engine_path_alias": deepspeed.runtime.engine.DeepSpeedEngine is deepscale.runtime.engine.Engine,
        "config_alias": deepspeed.DeepSpeedConfig is DeepSpeedConfig,
        "pp_is_deepscale": pp.__name__ == "deepscale.runtime.zero.partition_parameters",
        "lr_schedules": list(deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES),
        "comm_is_deepscale": dist is deepscale.comm,
        "cpu_adam_alias": DeepSpeedCPUAdam is deepscale.ops.adam.DeepScaleCPUAdam,
    }
    try:
        import deepspeed.no_such_module
    except ModuleNotFoundError as err:
        out["missing"] = str(err)
    try:
        from transformers.integrations.deepspeed import is_deepspeed_available
        out["hf_available"] = bool(is_deepspeed_available())
    except ImportError:
        pass
    try:
        from accelerate.utils import is_deepspeed_available, compare_versions
        out["accelerate_available"] = bool(is_deepspeed_available()) and compare_versions("deepspeed", ">=", "0.16.4")
    except ImportError:
        pass
    print("PROBE" + json.dumps(out))
""")


def _probe(shim_dir, *extra_paths, env_extra=None):
    env = shim_env(shim_dir, *extra_paths)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (SHIM / "pyproject.toml").read_text(), re.M).group(1)


def test_shim_version_is_declared_once_consistently():
    init_version = re.search(r'_SHIM_VERSION = "([^"]+)"', (SHIM / "deepspeed" / "__init__.py").read_text()).group(1)
    assert init_version == _pyproject_version()
    assert "+deepscale" in init_version  # the guard tells the shim from a real DeepSpeed by this label


def test_installed_shim_aliases_deepscale(shim_dir):
    proc = _probe(shim_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("PROBE", 1)[1])
    assert out["version"] == out["metadata_version"] == _pyproject_version()
    assert out["same_module"] and out["module_name"] == "deepscale.runtime.engine"  # no copies
    assert out["engine_alias"] and out["engine_path_alias"] and out["config_alias"] and out["pp_is_deepscale"]
    assert out["comm_is_deepscale"] and out["cpu_adam_alias"] and "WarmupLR" in out["lr_schedules"]
    assert "deepspeed.no_such_module" in out["missing"] and "deepscale.no_such_module" in out["missing"]
    launcher = shim_dir / "bin" / "deepspeed"  # DeepSpeed's command, the deepscale launcher
    assert launcher.is_file() and "deepscale.launcher.runner" in launcher.read_text()
    if "hf_available" in out:
        assert out["hf_available"]
    if "accelerate_available" in out:
        assert out["accelerate_available"]


def test_import_refuses_a_real_deepspeed_next_to_the_shim(shim_dir, tmp_path):
    fake = tmp_path / "site" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.14.0'\n")
    proc = _probe(shim_dir, tmp_path / "site")
    assert proc.returncode != 0
    assert "installed next to a real DeepSpeed" in proc.stderr and str(fake) in proc.stderr
    allowed = _probe(shim_dir, tmp_path / "site", env_extra={"DEEPSCALE_SHIM_ALLOW_DEEPSPEED": "1"})
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def _load_guard():
    spec = importlib_util.spec_from_file_location("_shim_guard_under_test", SHIM / "deepspeed" / "_guard.py")
    guard = importlib_util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    return guard


def test_guard_tells_real_deepspeed_from_the_shim(tmp_path):
    guard = _load_guard()
    real = tmp_path / "deepspeed-0.14.0.dist-info"
    real.mkdir()
    (real / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.14.0\n\n")
    shim_meta = tmp_path / "deepspeed-0.19.8+deepscale.dist-info"
    shim_meta.mkdir()
    (shim_meta / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8+deepscale\n\n")
    found = guard.find_real_deepspeed_installs([str(tmp_path)])
    assert found == [f"DeepSpeed 0.14.0 at {real}"]

    other = tmp_path / "other"
    (other / "deepspeed").mkdir(parents=True)
    (other / "deepspeed" / "__init__.py").write_text("from .runtime import engine\n")
    assert guard.find_real_deepspeed_installs([str(other)]) == [f"a deepspeed package at {other / 'deepspeed'}"]
    # The shim's own package is recognised by its content, and an explicit skip is honoured.
    assert guard.find_real_deepspeed_installs([str(SHIM)]) == []
    assert guard.find_real_deepspeed_installs([str(other)], skip_package_dir=str(other / "deepspeed")) == []


def test_build_refuses_when_a_real_deepspeed_is_installed(tmp_path):
    # setup.py scans this interpreter's site-packages; point sysconfig at a fake one.
    site = tmp_path / "site-packages"
    (site / "deepspeed-0.16.0.dist-info").mkdir(parents=True)
    (site / "deepspeed-0.16.0.dist-info" / "METADATA").write_text("Name: deepspeed\nVersion: 0.16.0\n\n")
    code = textwrap.dedent(f"""
        import sys, sysconfig
        real = sysconfig.get_paths
        sysconfig.get_paths = lambda *a, **k: dict(real(*a, **k), purelib={str(site)!r}, platlib={str(site)!r})
        sys.argv = ["setup.py", "--name"]
        import runpy
        runpy.run_path("setup.py", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=SHIM, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "refusing to build" in proc.stderr and "DeepSpeed 0.16.0" in proc.stderr
