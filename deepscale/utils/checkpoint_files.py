"""Write and read one checkpoint file with errors that name the file.

``torch.save`` into a full disk fails deep inside its zip writer (``unexpected pos 64 vs 0``)
and ``torch.load`` of a truncated file complains about a zip central directory; neither says
which file or why. These two wrappers turn such failures into errors that name the path and,
for a full disk, the bytes left on it.
"""
import errno
import os
import shutil

import torch


class CheckpointDiskFullError(OSError):
    """A checkpoint file could not be written because its disk is full (errno ``ENOSPC``).

    Attributes: ``filename`` (the file), ``free_bytes`` (free space on its disk afterwards, or
    None when unknown) and ``needed_bytes`` (the tensor bytes the file was to hold).
    """

    def __init__(self, path: str, free_bytes, needed_bytes: int):
        free = "unknown" if free_bytes is None else f"{free_bytes} bytes"
        super().__init__(errno.ENOSPC, f"the disk holding {os.path.dirname(path) or '.'} is full "
                         f"({free} free, the file needs about {needed_bytes} bytes)", path)
        self.free_bytes = free_bytes
        self.needed_bytes = needed_bytes


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated or corrupt). ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint file {path} is truncated or corrupt ({_size_text(path)}): {reason}")
        self.path = path


def _size_text(path: str) -> str:
    try:
        return f"{os.path.getsize(path)} bytes"
    except OSError:
        return "size unknown"


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of tensor data reachable from ``obj`` through dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _free_bytes(directory: str):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def save_file(obj, path: str) -> None:
    """``torch.save(obj, path)``; a full disk raises :class:`CheckpointDiskFullError`.

    Other failures re-raise as they are, with the path added to the message when missing.
    """
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as exc:
        needed = max(_tensor_bytes(obj), 1)
        free = _free_bytes(os.path.dirname(path) or ".")
        # torch's zip writer loses the errno (it raises RuntimeError); a disk with less free
        # space than the tensors alone need is the only likely reason then.
        if getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < needed):
            raise CheckpointDiskFullError(path, free, needed) from exc
        if isinstance(exc, OSError) or path in str(exc):
            raise
        raise RuntimeError(f"could not write checkpoint file {path}: {exc}") from exc


def load_file(path: str):
    """``torch.load(path)`` onto the CPU; a damaged file raises :class:`CorruptCheckpointError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, ModuleNotFoundError, AttributeError):
        raise  # missing file, or a class the pickle names that this program lacks: not damage
    except Exception as exc:  # zip, pickle and EOF errors all mean a damaged file here
        raise CorruptCheckpointError(path, f"{type(exc).__name__}: {exc}") from exc
