"""Shared pieces of the optimizer-offload tests: the offload config and a swap-file census."""
import os

from deepscale.runtime.offload.swap_file import SWAP_DIR_NAME


def offload_kwargs(device: str, nvme_root: str, **extra) -> dict:
    """``zero_optimization`` keys for ``offload_optimizer.device=device`` (plus ``extra`` offload keys)."""
    if device == "none":
        return {}
    section = {"device": device, **extra}
    if device == "nvme":
        section["nvme_path"] = nvme_root
    return {"offload_optimizer": section}


def swap_files(nvme_root: str) -> list:
    """Every swap file under ``nvme_root`` (relative paths)."""
    base = os.path.join(nvme_root, SWAP_DIR_NAME)
    out = []
    for root, _, files in os.walk(base):
        out += [os.path.relpath(os.path.join(root, f), base) for f in files]
    return sorted(out)
