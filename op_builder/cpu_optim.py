"""Builders of the CPU optimizers: Adam/AdamW, Adagrad and Lion.

Each op compiles only its own kernel file plus a small C entry file (no Python or torch
headers; loaded with ctypes), with the host's SIMD level baked into the flags and therefore
into the cache key.
"""
from op_builder.builder import Compatibility, OpBuilder
from op_builder.simd import detect_simd_level, simd_flags, simd_support_reason


class CPUOptimizerBuilder(OpBuilder):
    """Shared flags and checks of the CPU optimizer ops; ``KERNEL`` names the kernel files."""

    KERNEL = ""

    def sources(self):
        return [f"cpu_optim/{self.KERNEL}_kernel.cpp", f"cpu_optim/{self.KERNEL}_binding.cpp"]

    def include_dirs(self):
        return ["cpu_optim"]

    def simd_level(self):
        """The SIMD level this op is built for (``DEEPSCALE_SIMD`` overrides detection)."""
        return detect_simd_level()

    def cxx_args(self):
        return super().cxx_args() + ["-fopenmp"] + simd_flags(self.simd_level())

    def extra_ldflags(self):
        return ["-fopenmp"]

    def _installed_build_fits(self, manifest):
        # A wheel built on an AVX-512 machine must not run its kernels on an AVX2 one.
        return super()._installed_build_fits(manifest) and manifest.get("simd") == self.simd_level()

    def is_compatible(self, verbose=False):
        reason = simd_support_reason(self.simd_level())
        if reason:
            result = Compatibility(False, reason)
            if verbose:
                from deepscale.utils.logging import logger
                logger.warning(f"op '{self.NAME}' is not compatible: {reason}")
            return result
        return super().is_compatible(verbose)


class CPUAdamBuilder(CPUOptimizerBuilder):
    """Fused CPU Adam/AdamW (``deepscale.ops.adam.DeepScaleCPUAdam``)."""

    NAME = "cpu_adam"
    KERNEL = "adam"


class CPUAdagradBuilder(CPUOptimizerBuilder):
    """Fused CPU Adagrad (``deepscale.ops.adagrad.DeepScaleCPUAdagrad``)."""

    NAME = "cpu_adagrad"
    KERNEL = "adagrad"


class CPULionBuilder(CPUOptimizerBuilder):
    """Fused CPU Lion (``deepscale.ops.lion.DeepScaleCPULion``)."""

    NAME = "cpu_lion"
    KERNEL = "lion"
