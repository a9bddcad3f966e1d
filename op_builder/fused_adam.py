"""Builder of the fused multi-tensor CUDA Adam (``deepscale.ops.adam.FusedAdam``)."""
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from op_builder.builder import Compatibility, OpBuilder, OpBuildError, compiler_error_text, csrc_root


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_nvcc():
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc``, then PATH, then ``/usr/local/cuda/bin/nvcc``; None if absent."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version():
    """``(major, minor)`` of the nvcc found by :func:`find_nvcc`, or None."""
    nvcc = find_nvcc()
    return _nvcc_version(nvcc) if nvcc else None


class FusedAdamBuilder(OpBuilder):
    """Multi-tensor Adam/AdamW CUDA kernel; one launch per dtype group of tensors."""

    NAME = "fused_adam"
    PYTHON_MODULE = True  # the binding takes lists of CUDA tensors

    def sources(self):
        return ["fused_adam/fused_adam.cpp", "fused_adam/multi_tensor_adam.cu"]

    def include_dirs(self):
        return ["fused_adam"]

    def is_cuda(self):
        return True

    def cxx_args(self):
        return ["-O3", "-std=c++17"]

    def nvcc_args(self):
        return ["-O3", "-std=c++17"]

    def is_compatible(self, verbose=False):
        result = super().is_compatible(verbose)
        if not result:
            return result
        import torch
        nvcc = find_nvcc()
        if nvcc is None:
            return Compatibility(False, "no nvcc: CUDA toolkit not found (set CUDA_HOME)")
        if torch.version.cuda is None:
            return Compatibility(False, f"torch {torch.__version__} was built without CUDA")
        version = _nvcc_version(nvcc)
        torch_major = int(torch.version.cuda.split(".")[0])
        if version is None:
            return Compatibility(False, f"could not read the version of {nvcc}")
        if version[0] != torch_major:
            return Compatibility(False, f"CUDA major mismatch: nvcc is {version[0]}.{version[1]}, "
                                        f"torch was built with CUDA {torch.version.cuda}")
        return Compatibility(True)

    def compile_kernel_object(self, out_dir, arch="80"):
        """Compile the CUDA kernel alone with nvcc into ``out_dir``; return the object's path.

        Checks that the kernel builds with the installed toolkit on a machine that has no GPU
        (or no CUDA build of torch), which a full extension build cannot do.

        Args:
            out_dir: directory for the object file.
            arch: SM architecture to compile for. Default ``"80"``.
        """
        nvcc = find_nvcc()
        if nvcc is None:
            raise OpBuildError("no nvcc: CUDA toolkit not found (set CUDA_HOME)")
        out = Path(out_dir) / "multi_tensor_adam.o"
        cmd = [nvcc, "-c", *self.nvcc_args(), f"-gencode=arch=compute_{arch},code=sm_{arch}",
               f"-I{csrc_root() / 'fused_adam'}", str(csrc_root() / "fused_adam" / "multi_tensor_adam.cu"), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OpBuildError(f"building op '{self.NAME}' failed:\n{compiler_error_text(proc.stdout + proc.stderr)}")
        return out
