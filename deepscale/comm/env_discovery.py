"""Works out this process's rank, world size and rendezvous address from the environment.

Launchers describe a process in different variables: ``deepscale`` and torchrun set
RANK/WORLD_SIZE/LOCAL_RANK, OpenMPI sets ``OMPI_COMM_WORLD_*``, MPICH/Intel MPI (Hydra) set
``PMI_*`` and ``MPI_LOCAL*``, and Slurm's srun sets ``SLURM_*``. This module reads them in
that order and returns one :class:`ProcessEnv`.
"""
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_MASTER_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class ProcessEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    master_addr: Optional[str]
    master_port: Optional[int]
    source: str  # which launcher's variables were used


def _int(env: Mapping[str, str], *names: str, default=None):
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as err:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from err
    return default


def _first_slurm_host(nodelist: str) -> Optional[str]:
    """First host of a Slurm node list such as ``node[01-04,07],gpu3`` without calling scontrol."""
    if not nodelist:
        return None
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return None
    prefix, bracket = match.group(1), match.group(3)
    if not bracket:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_local_size(env: Mapping[str, str]) -> Optional[int]:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3"; the first entry is this job's typical value.
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    match = re.match(r"(\d+)", per_node)
    return int(match.group(1)) if match else None


def discover(env: Optional[Mapping[str, str]] = None) -> ProcessEnv:
    """Read the launcher's variables from ``env`` (``os.environ`` by default).

    Returns a :class:`ProcessEnv`; when no launcher variables are present it describes a
    single process (rank 0 of 1).
    """
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR")
    port = _int(env, "MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", default=rank)
        local_size = _int(env, "LOCAL_SIZE", "LOCAL_WORLD_SIZE", default=world)
        return ProcessEnv(rank, world, local_rank, local_size, addr, port, "env")
    if "OMPI_COMM_WORLD_RANK" in env:
        return ProcessEnv(
            _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1), addr, port, "openmpi")
    if "PMI_RANK" in env:
        return ProcessEnv(
            _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"),
            _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
            _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=1), addr, port, "mpich")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = addr or _first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        return ProcessEnv(
            _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", default=0),
            _slurm_local_size(env) or 1, addr, port, "slurm")
    return ProcessEnv(0, 1, 0, 1, addr, port, "single")


def export(penv: ProcessEnv, master_port: int) -> None:
    """Write the discovered values back as RANK/WORLD_SIZE/... so later code and torch read them."""
    os.environ["RANK"] = str(penv.rank)
    os.environ["WORLD_SIZE"] = str(penv.world_size)
    os.environ["LOCAL_RANK"] = str(penv.local_rank)
    os.environ["LOCAL_SIZE"] = str(penv.local_size)
    os.environ["MASTER_ADDR"] = penv.master_addr or DEFAULT_MASTER_ADDR
    os.environ["MASTER_PORT"] = str(penv.master_port or master_port)
