"""The import name ``deepspeed``, served by deepscale (an opt-in compatibility shim, not DeepSpeed).

Installed by ``pip install ./compat/deepspeed-shim`` from the deepscale repository, so that
Hugging Face Trainer/Accelerate and Lightning, which import ``deepspeed`` and check its version,
run on deepscale. ``deepspeed.X`` is ``deepscale.X`` and ``import deepspeed.a.b`` returns the
module ``deepscale.a.b`` itself (see deepscale/compat/deepspeed_alias.py). See docs/huggingface.md.
"""
import importlib.util as _importlib_util
import os as _os

# Must equal [project].version in pyproject.toml (a test checks it).
_SHIM_VERSION = "0.19.8+deepscale"


def _refuse_real_deepspeed_next_to_us():
    if _os.environ.get("DEEPSCALE_SHIM_ALLOW_DEEPSPEED") == "1":
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    spec = _importlib_util.spec_from_file_location("_deepscale_shim_guard", _os.path.join(here, "_guard.py"))
    guard = _importlib_util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    import sys
    found = guard.find_real_deepspeed_installs([p or _os.getcwd() for p in sys.path], skip_package_dir=here)
    if found:
        raise ImportError("the deepscale 'deepspeed' compatibility shim at " + here + " is installed next to a real "
                          "DeepSpeed (" + "; ".join(found) + "); which one 'import deepspeed' and version checks see "
                          "would depend on sys.path order. Uninstall one of them (pip uninstall deepspeed removes "
                          "whichever pip sees first), or set DEEPSCALE_SHIM_ALLOW_DEEPSPEED=1 to accept this.")


_refuse_real_deepspeed_next_to_us()

try:
    from deepscale.compat.deepspeed_alias import install_alias
except ImportError as _err:
    raise ImportError("the 'deepspeed' compatibility shim needs deepscale; install it from the deepscale repository "
                      "(pip install . ./compat/deepspeed-shim)") from _err

install_alias(globals(), _SHIM_VERSION)
del install_alias
