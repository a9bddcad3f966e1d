"""Builders of the attention ops: the CPU kernel (``cpu_attention``) and the CUDA one (``flash_attn``).

Both are used by ``deepscale.ops.attention.attention``, which routes each call to the best
kernel that can run it and falls back to PyTorch with a one-line reason otherwise.

``cpu_attention`` is a plain C library (ctypes, like the CPU optimizers): OpenMP threads and
the host's SIMD level, no Python or torch headers. ``flash_attn`` is a pybind11 module built
against torch; its kernels live in plain ``.cu`` files with C launchers (no torch headers), so
:meth:`FlashAttnBuilder.compile_kernel_objects` can check them with nvcc on a machine without a
GPU or a CUDA build of torch.
"""
import subprocess
from pathlib import Path

from op_builder.builder import OpBuildError, compiler_error_text, csrc_root
from op_builder.cpu_optim import CPUOptimizerBuilder
from op_builder.fused_adam import FusedAdamBuilder, find_nvcc

# SM architectures the CUDA kernel is written for: tensor-core mma.sync (sm80) and Hopper (sm90).
FLASH_ATTN_ARCHS = ("80", "90")


class CPUAttentionBuilder(CPUOptimizerBuilder):
    """Blocked online-softmax attention on CPU, forward and backward (``csrc/attention/cpu``)."""

    NAME = "cpu_attention"

    def sources(self):
        return ["attention/cpu/attn_cpu_fwd.cpp", "attention/cpu/attn_cpu_bwd.cpp",
                "attention/cpu/attn_cpu_binding.cpp"]

    def include_dirs(self):
        return ["attention/cpu", "cpu_optim"]

    def cxx_args(self):
        # -std=c++17 turns off floating-point contraction; the GEMM relies on fused multiply-adds.
        return super().cxx_args() + ["-ffp-contract=fast"]


class FlashAttnBuilder(FusedAdamBuilder):
    """Tensor-core flash attention for sm80/sm90, forward and backward (``csrc/attention/cuda``)."""

    NAME = "flash_attn"
    KERNEL_SOURCES = ("attention/cuda/flash_fwd.cu", "attention/cuda/flash_bwd.cu")

    def sources(self):
        return ["attention/cuda/flash_binding.cpp", *self.KERNEL_SOURCES]

    def include_dirs(self):
        return ["attention/cuda"]

    def nvcc_args(self):
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in FLASH_ATTN_ARCHS]
        return ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode]

    def compile_kernel_objects(self, out_dir, archs=FLASH_ATTN_ARCHS, head_dim=None):
        """Compile the CUDA kernels alone with nvcc, once per architecture; return the object paths.

        Args:
            out_dir: directory for the object files.
            archs: SM architectures. Default ``("80", "90")``.
            head_dim: instantiate only this head dim (a quicker check). Default None (all).
        """
        nvcc = find_nvcc()
        if nvcc is None:
            raise OpBuildError("no nvcc: CUDA toolkit not found (set CUDA_HOME)")
        objects = []
        for arch in archs:
            for source in self.KERNEL_SOURCES:
                out = Path(out_dir) / f"{Path(source).stem}_sm{arch}.o"
                cmd = [nvcc, "-c", "-O3", "-std=c++17", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                       f"-I{csrc_root() / 'attention' / 'cuda'}", str(csrc_root() / source), "-o", str(out)]
                if head_dim is not None:
                    cmd.append(f"-DDEEPSCALE_FLASH_ONE_HEAD_DIM={int(head_dim)}")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise OpBuildError(f"building op '{self.NAME}' for sm_{arch} failed:\n"
                                       f"{compiler_error_text(proc.stdout + proc.stderr)}")
                objects.append(out)
        return objects
