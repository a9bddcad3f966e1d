"""Detect the widest SIMD instruction set the host CPU offers.

The level is part of every CPU op's compiler flags and of its cache key, so a build made on
an AVX-512 machine is never loaded on an AVX2 one (it would die with SIGILL).
"""
import functools
import os
import platform

SIMD_LEVELS = ("avx512", "avx2", "neon", "scalar")

# Compiler flags per level. AVX2 implies FMA and F16C on every CPU that has it in practice,
# and the kernels use both, so the level requires all three flags.
_LEVEL_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c", "-D__DEEPSCALE_SIMD_AVX512__"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-D__DEEPSCALE_SIMD_AVX2__"],
    "neon": ["-D__DEEPSCALE_SIMD_NEON__"],
    "scalar": ["-D__DEEPSCALE_SIMD_SCALAR__"],
}
_REQUIRED_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "neon": set(),
    "scalar": set(),
}


@functools.lru_cache(maxsize=1)
def cpu_info():
    """``(arch, flags)`` of the host CPU, read through py-cpuinfo.

    py-cpuinfo's public ``get_cpu_info()`` spawns a subprocess and takes about a second; an op
    load must take milliseconds, so the /proc/cpuinfo reader is tried first and the full probe
    only where that finds nothing (non-Linux hosts).
    """
    import cpuinfo
    arch = platform.machine().lower()
    flags = []
    try:
        flags = cpuinfo.cpuinfo._get_cpu_info_from_proc_cpuinfo().get("flags", [])
    except Exception:  # a private helper: any change in it must only cost speed
        flags = []
    if not flags:
        info = cpuinfo.get_cpu_info()
        flags = info.get("flags", [])
        arch = str(info.get("arch", arch)).lower()
    return arch, frozenset(f.lower() for f in flags)


def _hardware_level(arch, flags):
    if arch in ("x86_64", "amd64", "x86_32", "i686"):
        for level in ("avx512", "avx2"):
            if _REQUIRED_FLAGS[level] <= flags:
                return level
        return "scalar"
    if arch.startswith("arm") or arch.startswith("aarch64"):
        return "neon" if ("asimd" in flags or "neon" in flags or arch.startswith("aarch64")) else "scalar"
    return "scalar"


def detect_simd_level():
    """The SIMD level CPU ops are built for: ``avx512``, ``avx2``, ``neon`` or ``scalar``.

    ``DEEPSCALE_SIMD`` overrides the detection (for example ``scalar`` to test the portable
    path); :func:`simd_support_reason` says whether an override can run on this CPU.
    """
    forced = os.environ.get("DEEPSCALE_SIMD", "").strip().lower()
    if forced:
        if forced not in SIMD_LEVELS:
            raise ValueError(f"DEEPSCALE_SIMD={forced!r} is not a SIMD level; allowed: {', '.join(SIMD_LEVELS)}")
        return forced
    arch, flags = cpu_info()
    return _hardware_level(arch, flags)


def simd_support_reason(level):
    """``None`` when this CPU can run code built for ``level``, else why it cannot."""
    arch, flags = cpu_info()
    if level in ("avx512", "avx2"):
        if arch not in ("x86_64", "amd64"):
            return f"SIMD level {level} needs an x86-64 CPU, this one is {arch}"
        missing = sorted(_REQUIRED_FLAGS[level] - flags)
        if missing:
            return f"unsupported CPU: SIMD level {level} needs CPU flags {', '.join(missing)}"
    if level == "neon" and not arch.startswith(("aarch64", "arm")):
        return f"SIMD level neon needs an ARM CPU, this one is {arch}"
    return None


def simd_flags(level):
    """Compiler flags that build the kernels for ``level``."""
    return list(_LEVEL_FLAGS[level])
