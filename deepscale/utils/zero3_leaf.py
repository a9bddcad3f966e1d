"""ZeRO-3 leaf modules: modules gathered whole at their forward, whose children get no hooks.

Mark them before ``deepscale.initialize`` (the ZeRO-3 hooks are installed there). A
mixture-of-experts block whose forward runs a data-dependent subset of its experts is the usual
case: without the mark each expert would be gathered by its own hooks only when it runs, so
ranks that route tokens differently would issue different collectives. See
``runtime/zero/stage3/hooks.py`` (Note: leaf modules). Same names and signatures as DeepSpeed's
``deepspeed.utils`` functions.
"""
from typing import List, Sequence, Union

LEAF_ATTR = "_z3_leaf"  # the attribute stage-3 hooks read (runtime/zero/stage3/hooks.py)


def _matches(module, classes: Sequence[Union[type, str]]) -> bool:
    for cls in classes:
        if isinstance(cls, str):
            if type(module).__name__ == cls or f"{type(module).__module__}.{type(module).__qualname__}" == cls:
                return True
        elif isinstance(cls, type):
            if isinstance(module, cls):
                return True
        else:
            raise TypeError(f"leaf module classes must be classes or class names, got {cls!r}")
    return False


def _set_flag(model, leaf_module_classes, flag: bool) -> List:
    import torch
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    classes = list(leaf_module_classes)
    changed = [m for m in model.modules() if _matches(m, classes)]
    if not changed:
        raise ValueError(f"no module of {[getattr(c, '__name__', c) for c in classes]} in the model")
    for module in changed:
        setattr(module, LEAF_ATTR, flag)
    return changed


def set_z3_leaf_modules(model, leaf_module_classes: Sequence[Union[type, str]]) -> List:
    """Mark every module of ``model`` that is an instance of one of ``leaf_module_classes``
    (classes, or class names as strings) as a ZeRO-3 leaf. Returns the marked modules; raises
    ``ValueError`` when none matches."""
    return _set_flag(model, leaf_module_classes, True)


def unset_z3_leaf_modules(model, leaf_module_classes: Sequence[Union[type, str]]) -> List:
    """Undo :func:`set_z3_leaf_modules` for those classes. Returns the modules unmarked."""
    return _set_flag(model, leaf_module_classes, False)


def z3_leaf_module(model) -> bool:
    """True when ``model`` (a module) is marked as a ZeRO-3 leaf."""
    return bool(getattr(model, LEAF_ATTR, False))


def z3_leaf_parameter(param) -> bool:
    """True when ``param`` belongs to a ZeRO-3 leaf module (set by the engine's hooks)."""
    return bool(getattr(param, "ds_z3_leaf", False))


def get_z3_leaf_modules(model) -> List:
    """The modules of ``model`` marked as ZeRO-3 leaves."""
    return [m for m in model.modules() if z3_leaf_module(m)]
