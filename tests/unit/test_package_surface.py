"""``import deepscale`` offers only what exists: every lazily exported submodule and attribute imports."""
import importlib
import pathlib

import pytest

import deepscale

PACKAGE_DIR = pathlib.Path(deepscale.__file__).resolve().parent


@pytest.mark.parametrize("name", deepscale._LAZY_SUBMODULES)
def test_every_lazy_submodule_imports(name):
    module = getattr(deepscale, name)
    assert module is importlib.import_module(f"deepscale.{name}")


@pytest.mark.parametrize("name", sorted(deepscale._LAZY_ATTRIBUTES))
def test_every_lazy_attribute_resolves(name):
    assert getattr(deepscale, name) is not None


def test_every_subpackage_is_offered():
    # A package added under deepscale/ (say moe/) is reachable as deepscale.<name> too.
    packages = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert packages - set(deepscale._LAZY_SUBMODULES) == set()


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'pipe_dream'"):
        deepscale.pipe_dream  # noqa: B018
