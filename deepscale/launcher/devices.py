"""What this node has: GPUs (counted without importing torch) and CPU cores for binding."""
import glob
import os
import shutil
import subprocess
from typing import List, Mapping, Optional


def _physical_gpu_count() -> int:
    # The NVIDIA driver lists one folder per GPU; nvidia-smi is the fallback where /proc is hidden.
    count = len(glob.glob("/proc/driver/nvidia/gpus/*"))
    if count or shutil.which("nvidia-smi") is None:
        return count
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def detect_gpu_count(environ: Optional[Mapping[str, str]] = None) -> int:
    """Number of GPUs this process may use (0 on a CPU-only node).

    Honours ``DEEPSCALE_ACCELERATOR=cpu`` (always 0) and ``CUDA_VISIBLE_DEVICES``.
    """
    environ = os.environ if environ is None else environ
    if environ.get("DEEPSCALE_ACCELERATOR", "").strip().lower() == "cpu":
        return 0
    physical = _physical_gpu_count()
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if physical == 0 or visible is None:
        return physical
    entries = [v for v in visible.split(",") if v.strip()]
    # CUDA stops at the first invalid entry such as -1.
    usable = 0
    for entry in entries:
        if entry.strip().lstrip("-").isdigit() and int(entry) < 0:
            break
        usable += 1
    return min(usable, physical)


def visible_devices(slots: List[int], environ: Mapping[str, str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a node's slots; slot ids index the caller's own list when it has one."""
    current = environ.get("CUDA_VISIBLE_DEVICES")
    if current:
        entries = [e.strip() for e in current.split(",") if e.strip()]
        if all(s < len(entries) for s in slots):
            return ",".join(entries[s] for s in slots)
    return ",".join(str(s) for s in slots)


def parse_core_list(text: str) -> List[int]:
    """Parse ``"0-3,8,10-11"`` into ``[0, 1, 2, 3, 8, 10, 11]``."""
    cores = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                cores.extend(range(low, high + 1))
            else:
                cores.append(int(part))
        except ValueError:
            raise ValueError(f"--bind_core_list {text!r}: expected core ids and ranges like '0-3,8,10-11'") from None
    if len(set(cores)) != len(cores) or any(c < 0 for c in cores):
        raise ValueError(f"--bind_core_list {text!r}: core ids must be distinct and non-negative")
    return cores


def split_cores(num_local_ranks: int, core_list: Optional[List[int]] = None) -> List[List[int]]:
    """Split the node's cores into equal, contiguous, disjoint sets, one per local rank.

    Args:
        num_local_ranks: ranks on this node.
        core_list: cores to share out. Default: the cores this process may run on.

    Raises:
        ValueError: fewer cores than ranks.
    """
    if core_list is None:
        core_list = sorted(os.sched_getaffinity(0))
    per_rank = len(core_list) // num_local_ranks
    if per_rank < 1:
        raise ValueError(f"--bind_cores_to_rank: {len(core_list)} core(s) cannot be split among "
                         f"{num_local_ranks} local ranks")
    return [core_list[i * per_rank:(i + 1) * per_rank] for i in range(num_local_ranks)]
