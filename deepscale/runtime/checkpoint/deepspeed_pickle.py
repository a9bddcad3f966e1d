"""Unpickle DeepSpeed's checkpoint files without importing DeepSpeed.

DeepSpeed's files pickle a few of its own classes (loss scaler, ZeRO stage enum, fragment
address). They are always rebuilt as stand-in objects holding the pickled constructor arguments
and attributes, never by importing DeepSpeed, so the files load whether DeepSpeed, a
compatibility shim named ``deepspeed`` or neither is installed.
"""
import pickle
import types
from typing import Tuple

import torch

from deepscale.utils.checkpoint_files import CorruptCheckpointError


class DeepSpeedStandIn:
    """Takes the place of a pickled DeepSpeed object: keeps constructor args and attributes."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Never import DeepSpeed's classes: a compatibility shim named ``deepspeed`` may be installed.
        if module == "deepspeed" or module.startswith("deepspeed."):
            return type(name, (DeepSpeedStandIn,), {"__module__": module})
        return super().find_class(module, name)


_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(),
                                __name__="pickle")


def load_ds_file(path: str):
    """``torch.load`` a DeepSpeed (or deepscale) file on CPU, whether or not DeepSpeed is importable;
    a damaged file raises ``CorruptCheckpointError`` naming it, as ``checkpoint_files.load_file``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except (FileNotFoundError, ModuleNotFoundError, AttributeError):
        raise  # missing file, or a class the pickle names that this program lacks: not damage
    except Exception as exc:  # zip, pickle and EOF errors all mean a damaged file here
        raise CorruptCheckpointError(path, f"{type(exc).__name__}: {exc}") from exc


def as_int(value) -> int:
    """An int from an int, a tensor or the stand-in of DeepSpeed's ZeroStageEnum."""
    if isinstance(value, DeepSpeedStandIn):
        return int(value.args[0])
    return int(value)


def fragment_address(obj) -> Tuple[int, int]:
    """(numel, start) of DeepSpeed's ``fragment_address`` (a stand-in, or computed here)."""
    if hasattr(obj, "numel") and hasattr(obj, "start"):
        return int(obj.numel), int(obj.start)
    return int(obj.args[0]), int(obj.args[1])
