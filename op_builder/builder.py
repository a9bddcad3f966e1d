"""The ``OpBuilder`` base: compatibility checks, cached JIT builds and ahead-of-time modules.

Note: how an op is found, in order.
  1. Already loaded in this process: returned at once.
  2. Built ahead of time at install (``DEEPSCALE_BUILD_OPS=1``): the installed package lists it
     in ``op_builder/_installed_ops.json`` and it is imported as ``op_builder.<module>``.
  3. The JIT cache: a directory named after the op and a hash of everything that changes the
     binary (sources, flags, SIMD level, torch/Python/CUDA versions). A finished build leaves a
     ``built.json`` marker; a hit loads the shared object directly, without running ninja or
     importing torch's extension machinery, which is what keeps a warm load in milliseconds.
Most ops are plain C libraries loaded with ``ctypes`` (``PYTHON_MODULE = False``): they need no
Python or torch headers, which cuts a cold build from tens of seconds to a few. Ops that must
take tensors in C++ (the CUDA ones) are pybind11 modules built against torch.
  4. A build, under an exclusive file lock so concurrent ranks on a node build once and the
     others wait and then take branch 3.
A build that fails raises :class:`OpBuildError` carrying the compiler's own error lines.
"""
import ctypes
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

_LOADED = {}
_FAILED = {}  # build dir -> error message: torch will not retry a failed name in one process
_ERROR_LINE = re.compile(r"(error|Error|undefined reference|fatal)")


class OpBuildError(RuntimeError):
    """An op could not be built or loaded; the message says why (compiler output included)."""


class Compatibility:
    """Result of :meth:`OpBuilder.is_compatible`: truthy when the op can be built here.

    Attributes:
        ok: whether the op can be JIT-built on this machine.
        reason: one line saying why not (empty when ``ok``).
    """

    def __init__(self, ok, reason=""):
        self.ok = bool(ok)
        self.reason = reason

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return "Compatibility(ok=True)" if self.ok else f"Compatibility(ok=False, reason={self.reason!r})"


def csrc_root():
    """Directory holding the C++/CUDA sources: ``op_builder/csrc`` in a wheel, ``<repo>/csrc`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise OpBuildError(f"the op sources (csrc/) were not found next to {here}; reinstall deepscale")


def cache_root():
    """Root of the JIT build cache.

    ``DEEPSCALE_OP_CACHE`` wins, then ``$TORCH_EXTENSIONS_DIR/deepscale``, then
    ``~/.cache/deepscale/ops``.
    """
    if os.environ.get("DEEPSCALE_OP_CACHE"):
        return Path(os.environ["DEEPSCALE_OP_CACHE"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "deepscale"
    return Path.home() / ".cache" / "deepscale" / "ops"


def installed_manifest():
    """The AOT manifest written at install: ``{"ops": {op: module}, "torch": ..., "simd": ...}``."""
    manifest = Path(__file__).resolve().parent / "_installed_ops.json"
    if not manifest.is_file():
        return {}
    try:
        return json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}


def installed_ops():
    """``{op name: module name}`` of the ops built ahead of time into this installation."""
    return installed_manifest().get("ops", {})


def _load_library(path, python_module, module_name):
    if not python_module:
        return ctypes.CDLL(str(path))
    return _import_extension(module_name, path)


def _import_extension(module_name, path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiler_error_text(output, max_lines=25):
    """The compiler's diagnostics from ninja/torch build output, without command lines.

    Keeps lines that mention an error plus the two lines after each (the source excerpt and
    caret); falls back to the output's tail when no such line is found.
    """
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith(("[", "FAILED:", "ninja:"))]
    keep = []
    for i, line in enumerate(lines):
        if _ERROR_LINE.search(line) and "Error building extension" not in line:
            for extra in lines[i:i + 3]:
                if extra not in keep:
                    keep.append(extra)
    chosen = keep or lines[-max_lines:]
    return "\n".join(chosen[:max_lines])


class OpBuilder:
    """Base of all op builders: one subclass per compiled op.

    Subclasses set ``NAME`` and implement :meth:`sources`; they may extend
    :meth:`include_dirs`, :meth:`cxx_args`, :meth:`nvcc_args`, :meth:`extra_ldflags` and
    :meth:`is_compatible`.
    """

    NAME = "base"
    BUILD_VERSION = "1"  # bump to invalidate every cached build of this op
    PYTHON_MODULE = False  # False: a plain shared library loaded with ctypes

    def __init__(self):
        self.name = self.NAME

    # --- what to build -------------------------------------------------------------------
    def sources(self):
        """Source files, relative to :func:`csrc_root`."""
        raise NotImplementedError

    def include_dirs(self):
        """Include directories, relative to :func:`csrc_root`."""
        return []

    def cxx_args(self):
        """Flags for the C++ compiler."""
        return ["-O3", "-std=c++17", "-fno-math-errno", "-Wno-unused-function"]

    def nvcc_args(self):
        """Flags for nvcc (CUDA ops only)."""
        return []

    def extra_ldflags(self):
        """Flags for the linker."""
        return []

    def is_cuda(self):
        """True for ops with CUDA sources."""
        return False

    def module_name(self):
        """Python module name of the built extension."""
        return f"deepscale_{self.NAME}_op"

    # --- compatibility -------------------------------------------------------------------
    def compiler(self):
        """The C++ compiler torch's extension machinery will call (``CXX`` or ``c++``)."""
        return os.environ.get("CXX", "c++")

    def is_compatible(self, verbose=False):
        """Whether this op can be JIT-built here; a :class:`Compatibility` carrying the reason.

        Args:
            verbose: log the reason when incompatible. Default False.
        """
        result = self._check_toolchain()
        if verbose and not result:
            from deepscale.utils.logging import logger
            logger.warning(f"op '{self.NAME}' is not compatible: {result.reason}")
        return result

    def _check_toolchain(self):
        cxx = self.compiler()
        if shutil.which(cxx) is None:
            return Compatibility(False, f"no C++ compiler: '{cxx}' is not on PATH (install g++ or set CXX)")
        if shutil.which("ninja") is None:
            return Compatibility(False, "ninja is not on PATH (pip install ninja)")
        return Compatibility(True)

    # --- caching -------------------------------------------------------------------------
    def absolute_sources(self):
        root = csrc_root()
        return [str(root / s) for s in self.sources()]

    def absolute_include_dirs(self):
        root = csrc_root()
        return [str(root / d) for d in self.include_dirs()]

    def _hashed_files(self):
        """Sources plus every header in the include directories: all that shapes the binary."""
        files = [Path(s) for s in self.absolute_sources()]
        for inc in self.absolute_include_dirs():
            files.extend(sorted(p for p in Path(inc).glob("*") if p.suffix in (".h", ".cuh", ".hpp")))
        return files

    def cache_key(self):
        """Hash of sources, flags and the toolchain/runtime versions the binary depends on."""
        import torch
        digest = hashlib.sha256()
        for path in self._hashed_files():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        config = [self.BUILD_VERSION, self.cxx_args(), self.nvcc_args(), self.extra_ldflags(), torch.__version__,
                  str(torch.version.cuda), sys.version, self.compiler()]
        digest.update(json.dumps(config).encode())
        return digest.hexdigest()[:16]

    def build_dir(self):
        return cache_root() / f"{self.NAME}-{self.cache_key()}"

    # --- loading -------------------------------------------------------------------------
    def load(self, verbose=False):
        """Return the op's Python module, building it if needed.

        Args:
            verbose: print the build commands and compiler output. Default False.

        Raises:
            OpBuildError: the op cannot be built here (the reason) or the build failed (the
                compiler's error lines).
        """
        module = self._load_installed()
        if module is not None:
            return module
        build_dir = self.build_dir()
        key = str(build_dir)
        if key in _LOADED:
            return _LOADED[key]
        if key in _FAILED:
            raise OpBuildError(_FAILED[key])
        module = self._load_cached(build_dir)
        if module is None:
            try:
                module = self._build_locked(build_dir, verbose)
            except OpBuildError as exc:
                _FAILED[key] = str(exc)
                raise
        _LOADED[key] = module
        return module

    def _load_installed(self):
        manifest = installed_manifest()
        module_name = manifest.get("ops", {}).get(self.NAME)
        if not module_name or os.environ.get("DEEPSCALE_IGNORE_INSTALLED_OPS") == "1":
            return None
        if not self._installed_build_fits(manifest):
            return None
        try:
            if self.PYTHON_MODULE:
                return importlib.import_module(f"op_builder.{module_name}")
            here = Path(__file__).resolve().parent
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                if (here / f"{module_name}{suffix}").is_file():
                    return ctypes.CDLL(str(here / f"{module_name}{suffix}"))
        except (ImportError, OSError):
            pass  # a stale manifest (torch upgraded since install): fall back to JIT
        return None

    def _installed_build_fits(self, manifest):
        """False when the AOT build was made for another torch or SIMD level (a copied install)."""
        import torch
        if manifest.get("torch") not in (None, torch.__version__):
            return False
        return True

    def _load_cached(self, build_dir):
        marker = build_dir / "built.json"
        if not marker.is_file():
            return None
        try:
            info = json.loads(marker.read_text())
            return _load_library(info["path"], self.PYTHON_MODULE, info["module"])
        except (OSError, ValueError, KeyError, ImportError):
            return None  # damaged or half-removed cache entry: rebuild it

    def _build_locked(self, build_dir, verbose):
        compat = self.is_compatible()
        if not compat:
            raise OpBuildError(f"op '{self.NAME}' cannot be built: {compat.reason}")
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir.parent / f"{build_dir.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here, then find the marker
            try:
                module = self._load_cached(build_dir)
                if module is None:
                    module = self._build(build_dir, verbose)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return module

    def _build(self, build_dir, verbose):
        from deepscale.utils.logging import logger
        # A first build takes from seconds to minutes; say so, or a run looks hung.
        logger.info(f"building op '{self.NAME}' (first use with this torch and these sources; the build is cached "
                    f"in {build_dir}) ...")
        start = time.time()
        try:
            module_name, path = self._torch_build(build_dir, verbose)
            module = _load_library(path, self.PYTHON_MODULE, module_name)
        except (RuntimeError, OSError, ImportError) as exc:
            text = compiler_error_text(str(exc))
            # `from None`: the compiler's message is the useful part, not torch's frames.
            raise OpBuildError(f"building op '{self.NAME}' failed after {time.time() - start:.1f}s:\n{text}") from None
        marker = {"module": module_name, "path": str(path), "built_at": time.time()}
        tmp = build_dir / "built.json.tmp"
        tmp.write_text(json.dumps(marker))
        os.replace(tmp, build_dir / "built.json")
        logger.info(f"built op '{self.NAME}' in {time.time() - start:.1f}s")
        return module

    def _torch_build(self, build_dir, verbose):
        """Build with torch's ninja-based machinery; returns (module name, library path)."""
        from torch.utils import cpp_extension
        kwargs = dict(name=self.module_name(), sources=self.absolute_sources(),
                      extra_include_paths=self.absolute_include_dirs(), extra_cflags=self.cxx_args(),
                      extra_ldflags=self.extra_ldflags(), build_directory=str(build_dir), verbose=verbose,
                      is_python_module=self.PYTHON_MODULE)
        if self.is_cuda():
            kwargs.update(extra_cuda_cflags=self.nvcc_args(), with_cuda=True)
        module = cpp_extension.load(**kwargs)
        if isinstance(module, (str, os.PathLike)):  # recent torch returns the library's path
            return Path(module).stem, Path(module)
        if module is not None:
            return module.__name__, module.__file__
        # A plain library: torch may have versioned its name (name_v1) if it was rebuilt in
        # this process, so take the newest shared object in the build directory.
        newest = max(Path(build_dir).glob(f"{self.module_name()}*.so"), key=lambda p: p.stat().st_mtime)
        return newest.stem, newest

    # --- ahead of time -------------------------------------------------------------------
    def aot_extension(self):
        """A setuptools extension that builds this op at install time (see setup.py)."""
        from torch.utils import cpp_extension
        root = csrc_root()
        sources = [os.path.relpath(str(root / s)) for s in self.sources()]
        includes = self.absolute_include_dirs()
        name = f"op_builder.{self.module_name()}"
        if self.is_cuda():
            return cpp_extension.CUDAExtension(name=name, sources=sources, include_dirs=includes,
                                               extra_compile_args={"cxx": self.cxx_args(), "nvcc": self.nvcc_args()},
                                               extra_link_args=self.extra_ldflags())
        return cpp_extension.CppExtension(name=name, sources=sources, include_dirs=includes,
                                          extra_compile_args={"cxx": self.cxx_args()},
                                          extra_link_args=self.extra_ldflags())
