"""Make the import name ``deepspeed`` resolve to deepscale (used by the opt-in compat distribution).

Hugging Face Trainer, Accelerate and Lightning import a package called ``deepspeed`` and read the
installed distribution's version, so ``import deepscale as deepspeed`` cannot reach them. The
compat distribution in ``compat/deepspeed-shim`` installs a one-file ``deepspeed`` package that
calls :func:`install_alias`; from then on:

* ``deepspeed.X`` (an attribute) is ``deepscale.X``;
* ``import deepspeed.a.b`` returns the module object ``deepscale.a.b`` itself, so there is one
  copy of every module and class (``isinstance(engine, deepspeed.DeepSpeedEngine)`` holds, module
  state such as process groups is shared);
* a DeepSpeed module path deepscale does not have fails with ``ModuleNotFoundError`` naming it.

Note: how the alias works. A meta-path finder placed first on ``sys.meta_path`` claims every
``deepspeed.*`` name. Its loader imports the matching ``deepscale.*`` module and, in
``exec_module``, puts that module into ``sys.modules`` under the ``deepspeed.*`` name; the
import machinery then returns whatever ``sys.modules`` holds, so the placeholder module it
created is dropped and the deepscale module's own ``__spec__``/``__name__`` stay untouched.

This module imports nothing from deepscale at import time (``import deepspeed`` stays as cheap as
``import deepscale``).
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

ALIAS = "deepspeed"
TARGET = "deepscale"


def target_name(fullname: str) -> str:
    """``deepspeed.a.b`` -> ``deepscale.a.b``."""
    return TARGET + fullname[len(ALIAS):]


class _AliasLoader(importlib.abc.Loader):
    """Loads ``deepspeed.X`` by importing ``deepscale.X`` and registering it under both names."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return None  # a placeholder; exec_module swaps in the real module

    def exec_module(self, module):
        real = importlib.import_module(self.target)
        sys.modules[module.__spec__.name] = real


class DeepSpeedAliasFinder(importlib.abc.MetaPathFinder):
    """Claims ``deepspeed.*`` imports whose ``deepscale.*`` counterpart exists."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(ALIAS + "."):
            return None
        real_name = target_name(fullname)
        if real_name in sys.modules:
            found = True
        else:
            try:
                found = importlib.util.find_spec(real_name) is not None
            except ModuleNotFoundError:  # a parent package is missing
                found = False
        if not found:
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: the deepspeed compatibility shim maps it to {real_name!r}, which "
                f"deepscale does not provide (see docs/huggingface.md for what is covered)", name=fullname)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real_name), is_package=True)


def install_alias(package_globals: dict, version: str) -> None:
    """Turn the calling ``deepspeed`` package into a view of ``deepscale``.

    Args:
        package_globals: ``globals()`` of the shim's ``deepspeed/__init__.py``; it gains a module
            ``__getattr__``/``__dir__`` forwarding to deepscale and ``__version__``.
        version: the DeepSpeed-compatible version the shim distribution reports (its metadata
            version), e.g. ``"0.19.8+deepscale"``.
    """
    import deepscale

    if not any(isinstance(finder, DeepSpeedAliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, DeepSpeedAliasFinder())

    def __getattr__(name):
        try:
            return getattr(deepscale, name)
        except AttributeError:
            raise AttributeError(f"module 'deepspeed' (the deepscale compatibility shim) has no attribute "
                                 f"{name!r}") from None

    def __dir__():
        return sorted(set(package_globals) | set(dir(deepscale)) | set(getattr(deepscale, "_LAZY_ATTRIBUTES", ())))

    package_globals["__getattr__"] = __getattr__
    package_globals["__dir__"] = __dir__
    package_globals["__version__"] = version
    package_globals["__deepscale_version__"] = deepscale.__version__


def is_alias_module(module: types.ModuleType) -> bool:
    """True when ``module`` is the shim's ``deepspeed`` package (for diagnostics and tests)."""
    return getattr(module, "__deepscale_version__", None) is not None
