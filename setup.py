"""Build script; all metadata lives in pyproject.toml.

What this adds to a plain setuptools build:
  * csrc/ is copied into the installed ``op_builder`` package, so the JIT build of every op
    works from a non-editable install (a wheel).
  * Ahead-of-time op builds: ``DEEPSCALE_BUILD_OPS=1`` builds every op that is compatible with
    this machine, ``DEEPSCALE_BUILD_<OP>=1`` (e.g. ``DEEPSCALE_BUILD_CPU_ADAM=1``) one op, and
    ``DEEPSCALE_BUILD_<OP>=0`` leaves one out. The built ops are listed in
    ``op_builder/_installed_ops.json`` inside the installed package; ``deepscale report`` shows
    them. An AOT build needs torch at build time: ``pip install --no-build-isolation .``.
Without those variables nothing is compiled and torch is not imported here.
"""
import json
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
OP_NAMES = ("cpu_adam", "cpu_adagrad", "cpu_lion", "fused_adam", "async_io", "async_io_uring", "cpu_attention",
            "flash_attn")


def requested_ops():
    """Op names the environment asks to build ahead of time."""
    build_all = os.environ.get("DEEPSCALE_BUILD_OPS", "0") == "1"
    default = "1" if build_all else "0"
    return [name for name in OP_NAMES if os.environ.get(f"DEEPSCALE_BUILD_{name.upper()}", default) == "1"]


def aot_extensions():
    """(setuptools extensions, {op: module name}) for the requested ops this machine can build."""
    names = requested_ops()
    if not names:
        return [], {}
    try:
        import torch
    except ImportError:
        sys.exit("DEEPSCALE_BUILD_OPS needs torch at build time: pip install --no-build-isolation .")
    print(f"deepscale: building ops ahead of time against torch {torch.__version__}: {', '.join(names)}")
    sys.path.insert(0, ROOT)
    from op_builder import get_builder
    extensions, built = [], {}
    for name in names:
        builder = get_builder(name)
        compat = builder.is_compatible()
        if not compat:
            print(f"deepscale: not building op '{name}' ahead of time: {compat.reason}", file=sys.stderr)
            continue
        extensions.append(builder.aot_extension())
        built[name] = builder.module_name()
    return extensions, built


EXTENSIONS, AOT_OPS = aot_extensions()


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside op_builder and record the ops built ahead of time."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "op_builder")
        if os.path.isdir(target) and os.path.isdir(os.path.join(ROOT, "csrc")):
            shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(target, "csrc"), dirs_exist_ok=True)
            manifest = {"ops": AOT_OPS}
            if AOT_OPS:
                from op_builder.simd import detect_simd_level
                import torch
                manifest.update(torch=torch.__version__, simd=detect_simd_level())
            with open(os.path.join(target, "_installed_ops.json"), "w") as f:
                json.dump(manifest, f)


cmdclass = {"build_py": BuildPyWithSources}
if EXTENSIONS:
    from torch.utils.cpp_extension import BuildExtension
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(cmdclass=cmdclass, ext_modules=EXTENSIONS)
