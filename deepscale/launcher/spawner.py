"""The per-node process spawner: starts the local ranks, watches them, stops them together.

Each rank runs in its own session (process group) so that a stop reaches the rank's whole
process tree (data-loader workers included) and a terminal's Ctrl-C reaches only the
launcher, which forwards it. Where util-linux ``setpriv`` exists, ranks also get a parent
death signal, so a launcher killed with SIGKILL does not leave orphaned ranks behind.
"""
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from deepscale.launcher.constants import DEFAULT_KILL_GRACE_S, KILL_GRACE_VAR, RESTART_COUNT_VAR
from deepscale.launcher.devices import visible_devices
from deepscale.launcher.output import OutputTail, stderr_buffer, stdout_buffer, tail_file
from deepscale.launcher.world import WorldInfo


@dataclass
class ScriptSpec:
    """What every rank runs.

    Args:
        user_script: the training script (or module name with ``module``, or program with ``no_python``).
        user_args: arguments after the script.
        no_python: run ``user_script`` directly instead of through Python. Default False.
        module: run ``python -m user_script``. Default False.
        no_local_rank: do not pass ``--local_rank=<i>``. Default False.
        python: the interpreter. Default: the caller's (``sys.executable``).
    """
    user_script: str
    user_args: List[str] = field(default_factory=list)
    no_python: bool = False
    module: bool = False
    no_local_rank: bool = False
    python: str = sys.executable

    def command(self, local_rank: int) -> List[str]:
        """The argv of the rank with local rank ``local_rank``."""
        if self.no_python:
            cmd = [self.user_script]
        elif self.module:
            cmd = [self.python, "-u", "-m", self.user_script]
        else:
            cmd = [self.python, "-u", self.user_script]
        if not self.no_local_rank:
            cmd.append(f"--local_rank={local_rank}")
        return cmd + list(self.user_args)


@dataclass
class RankSpec:
    """One local rank: its ranks, argv, environment additions, log file, cores and console line prefix."""
    rank: int
    local_rank: int
    cmd: List[str]
    env: Dict[str, str]
    log_path: Optional[str] = None
    cores: Optional[List[int]] = None
    output_prefix: bytes = b""


def rank_environment(world: WorldInfo, node_rank: int, local_rank: int, master_addr: str, master_port: int,
                     base_env: Dict[str, str], restart_count: int = 0) -> Dict[str, str]:
    """The variables the launcher sets for one rank (on top of the inherited environment)."""
    return {
        "RANK": str(world.first_rank(node_rank) + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world.world_size),
        "LOCAL_SIZE": str(world.local_size(node_rank)),
        "LOCAL_WORLD_SIZE": str(world.local_size(node_rank)),
        "CROSS_RANK": str(node_rank),
        "CROSS_SIZE": str(world.num_nodes),
        "NODE_RANK": str(node_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "CUDA_VISIBLE_DEVICES": visible_devices(world.slots[world.host(node_rank)], base_env),
        RESTART_COUNT_VAR: str(restart_count),
    }


def build_rank_specs(world: WorldInfo, node_rank: int, master_addr: str, master_port: int, script: ScriptSpec,
                     base_env: Dict[str, str], log_dir: Optional[str] = None,
                     core_sets: Optional[List[List[int]]] = None, restart_count: int = 0,
                     omp_threads: Optional[int] = None, rank_prefix: bool = False) -> List[RankSpec]:
    """One :class:`RankSpec` per local rank of node ``node_rank``.

    Args:
        log_dir: when given, rank ``r`` writes to ``<log_dir>/rank<r>.log`` instead of the console.
        core_sets: per local rank, the cores it is bound to (``OMP_NUM_THREADS`` follows).
        restart_count: exported as ``DEEPSCALE_RESTART_COUNT``.
        omp_threads: ``OMP_NUM_THREADS`` of every rank not bound to cores; None leaves it
            inherited (see ``threads.default_omp_threads``).
        rank_prefix: start each console line of rank ``r`` with ``[rank r] ``.
    """
    specs = []
    for local_rank in range(world.local_size(node_rank)):
        env = rank_environment(world, node_rank, local_rank, master_addr, master_port, base_env, restart_count)
        cores = core_sets[local_rank] if core_sets else None
        if cores:
            env["OMP_NUM_THREADS"] = str(len(cores))
        elif omp_threads is not None:
            env["OMP_NUM_THREADS"] = str(omp_threads)
        rank = int(env["RANK"])
        log_path = os.path.join(log_dir, f"rank{rank}.log") if log_dir else None
        prefix = f"[rank {rank}] ".encode() if rank_prefix else b""
        specs.append(RankSpec(rank, local_rank, script.command(local_rank), env, log_path, cores, prefix))
    return specs


def launch_prefix(cores: Optional[List[int]]) -> List[str]:
    """Programs that wrap a rank's argv: parent-death signal and core binding (both exec the rank)."""
    prefix = []
    if shutil.which("setpriv"):
        prefix += ["setpriv", "--pdeathsig", "KILL", "--"]
    if cores and shutil.which("taskset"):
        prefix += ["taskset", "-c", ",".join(str(c) for c in cores)]
    return prefix


def exit_code_of(returncode: int) -> int:
    """Shell-style exit code: a rank killed by signal ``s`` counts as ``128 + s``."""
    return 128 - returncode if returncode < 0 else returncode


def kill_grace_s() -> float:
    """Seconds between the polite stop signal and SIGKILL (``$DEEPSCALE_KILL_GRACE_S``)."""
    text = os.environ.get(KILL_GRACE_VAR)
    try:
        return float(text) if text else DEFAULT_KILL_GRACE_S
    except ValueError:
        raise ValueError(f"{KILL_GRACE_VAR}={text!r} must be a number of seconds") from None


class RankProcess:
    """A started rank: its process, output tail and log file."""

    def __init__(self, spec: RankSpec, base_env: Dict[str, str], append_log: bool = False):
        self.spec = spec
        env = dict(base_env)
        env.update(spec.env)
        argv = launch_prefix(spec.cores) + spec.cmd
        self._log = None
        self._tail = None
        if spec.log_path:
            os.makedirs(os.path.dirname(spec.log_path) or ".", exist_ok=True)
            self._log = open(spec.log_path, "ab" if append_log else "wb")
            self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        else:
            self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
            self._tail = OutputTail(prefix=spec.output_prefix)
            self._tail.attach(self.popen.stdout, stdout_buffer())
            self._tail.attach(self.popen.stderr, stderr_buffer())
        if spec.cores and not shutil.which("taskset"):
            os.sched_setaffinity(self.popen.pid, spec.cores)
        # Exit times order failures: a rank that crashes makes its peers fail a moment later,
        # and the report must name the first one, not the first one polled.
        self.exit_time: Optional[float] = None
        self._waiter = threading.Thread(target=self._wait_exit, daemon=True)
        self._waiter.start()

    def _wait_exit(self) -> None:
        self.popen.wait()
        self.exit_time = time.time()

    def poll(self) -> Optional[int]:
        """The return code once the rank exited and its exit time is recorded, else None."""
        if self.exit_time is None:
            return None
        return self.popen.returncode

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the rank's process group (its whole tree)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signum)
            except ProcessLookupError:
                pass

    def tail(self) -> List[str]:
        """The rank's last output lines."""
        if self._tail is not None:
            self._tail.join(timeout=1.0)
            return self._tail.lines()
        self._log.flush()
        return tail_file(self.spec.log_path)

    def close(self) -> None:
        """Close the log file, if any."""
        if self._log is not None:
            self._log.close()


@dataclass
class Failure:
    """The first rank that failed: its exit code and last output lines.

    ``primary`` is False when the rank died because the launcher was already stopping the job.
    """
    rank: int
    exit_code: int
    tail: List[str]
    primary: bool = True
    node_rank: int = 0
    host: str = "localhost"
    exit_time: float = 0.0

    def describe(self) -> str:
        """One line naming the rank, its node and its exit code."""
        cause = "" if self.primary else " while the job was being stopped"
        return f"rank {self.rank} (node {self.node_rank}, {self.host}) exited with code {self.exit_code}{cause}"
