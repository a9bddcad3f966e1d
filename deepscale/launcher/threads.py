"""The default thread count of each local rank (``OMP_NUM_THREADS``).

Note (why a default): a rank that does not set ``OMP_NUM_THREADS`` starts one OpenMP thread
per physical core. N ranks on one node then run N times as many compute threads as there
are cores, and their busy-waiting thread pools fight for the cores: two CPU ranks on two
cores trained the example GPT 6-11x slower than with one thread each. So, as torchrun does,
the launcher gives every local rank its share of the cores, ``max(1, cores // local ranks)``,
when the user has not chosen. Only ``OMP_NUM_THREADS`` is set: torch sizes its intra-op pool
from it, and MKL and OpenBLAS follow it unless their own variable (``MKL_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``) is set, which the launcher then passes through untouched.
"""
import os
from typing import Iterable, Mapping, Optional, Tuple

OMP_VAR = "OMP_NUM_THREADS"


def _sibling_key(cpu: int) -> Optional[Tuple[str, str]]:
    base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
    try:
        with open(os.path.join(base, "physical_package_id")) as package, open(os.path.join(base, "core_id")) as core:
            return package.read().strip(), core.read().strip()
    except OSError:
        return None


def usable_cores(cpus: Optional[Iterable[int]] = None) -> int:
    """Physical cores among the CPUs this process may run on (hyperthreads of one core count once).

    Args:
        cpus: logical CPU ids. Default: ``os.sched_getaffinity(0)``.

    Falls back to the number of logical CPUs where the topology in /sys cannot be read.
    """
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    keys = [_sibling_key(cpu) for cpu in cpus]
    if not cpus or any(key is None for key in keys):
        return max(1, len(cpus))
    return len(set(keys))


def default_omp_threads(environ: Mapping[str, str], num_local_ranks: int,
                        cores: Optional[int] = None) -> Tuple[Optional[int], str]:
    """``(threads, message)``: the ``OMP_NUM_THREADS`` to give each local rank, or None to leave it.

    None when the user set ``OMP_NUM_THREADS`` (their choice wins) or the node runs a single
    rank (torch's own default, one thread per physical core, is then right). ``message`` is
    the one line to log, empty when there is nothing to say.

    Args:
        environ: the environment the ranks inherit.
        num_local_ranks: ranks on this node.
        cores: usable cores. Default :func:`usable_cores`.
    """
    if OMP_VAR in environ:
        return None, ""
    if num_local_ranks <= 1:
        return None, ""
    cores = usable_cores() if cores is None else cores
    threads = max(1, cores // num_local_ranks)
    return threads, (f"{OMP_VAR} is not set: each of the {num_local_ranks} local ranks gets {OMP_VAR}={threads} "
                     f"({cores} usable core(s) / {num_local_ranks} ranks); set {OMP_VAR} to choose another value")
