"""The per-node launcher: ``python -m deepscale.launcher.launch --world_info=... script.py ...``.

The runner starts one of these on every node (through pdsh, ssh, mpirun or srun). It
starts the node's ranks with the spawner, reports to the runner's job controller, and
stops its ranks when a rank fails, when a signal arrives, or when the runner says so.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from deepscale.launcher.constants import DEFAULT_PID_DIR, PID_DIR_VAR
from deepscale.launcher.devices import parse_core_list, split_cores
from deepscale.launcher.net import check_master_port
from deepscale.launcher.output import format_tail
from deepscale.launcher.rank_group import GroupOutcome, RankGroup
from deepscale.launcher.signals import StopRequest, install_handlers, restore_handlers
from deepscale.launcher.spawner import Failure, ScriptSpec, build_rank_specs, kill_grace_s
from deepscale.launcher.threads import default_omp_threads
from deepscale.launcher.world import WorldInfo
from deepscale.utils.logging import logger


@dataclass
class NodeOptions:
    """Per-node settings shared by the runner's local mode and the per-node launcher.

    Args:
        log_dir: per-rank log files folder, or None for the console.
        bind_cores_to_rank: give each rank its own share of the cores.
        bind_core_list: the cores to share (``"0-7,16-23"``); None means all.
        restart_count: which attempt this is (0 for the first).
        save_pid: the runner's pid, to name the pid file; None disables it.
        rank_prefix: start each console line of rank R with ``[rank R] ``.
    """
    log_dir: Optional[str] = None
    bind_cores_to_rank: bool = False
    bind_core_list: Optional[str] = None
    restart_count: int = 0
    save_pid: Optional[int] = None
    rank_prefix: bool = False


def pid_file_path(runner_pid: int, node_rank: int) -> str:
    """``$DEEPSCALE_PID_DIR/<runner pid>.node<k>.deepscale`` (default folder /tmp)."""
    return os.path.join(os.environ.get(PID_DIR_VAR, DEFAULT_PID_DIR), f"{runner_pid}.node{node_rank}.deepscale")


def _write_pid_file(path: str, ranks: Dict[int, int]) -> None:
    lines = [f"launcher {os.getpid()}"] + [f"rank {rank} {pid}" for rank, pid in sorted(ranks.items())]
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def run_node(world: WorldInfo, node_rank: int, master_addr: str, master_port: int, script: ScriptSpec,
             options: NodeOptions, stop: StopRequest,
             on_failure: Optional[Callable[[Failure], None]] = None) -> GroupOutcome:
    """Start node ``node_rank``'s ranks and watch them until they all exited.

    Raises:
        ValueError/RuntimeError: the ranks cannot be started (port in use, bad core list, missing program).
    """
    if node_rank == 0:
        check_master_port(master_port, where=f"{world.host(0)} (node 0, which runs rank 0)")
    core_sets = None
    if options.bind_cores_to_rank:
        cores = parse_core_list(options.bind_core_list) if options.bind_core_list else None
        core_sets = split_cores(world.local_size(node_rank), cores)
    omp_threads = None
    if core_sets is None:
        omp_threads, message = default_omp_threads(os.environ, world.local_size(node_rank))
        if message and options.restart_count == 0:
            logger.info(message)
    specs = build_rank_specs(world, node_rank, master_addr, master_port, script, dict(os.environ),
                             options.log_dir, core_sets, options.restart_count, omp_threads,
                             options.rank_prefix)
    group = RankGroup(specs, dict(os.environ), kill_grace_s(), append_logs=options.restart_count > 0)
    group.start()
    pid_path = pid_file_path(options.save_pid, node_rank) if options.save_pid else None
    try:
        if pid_path:
            _write_pid_file(pid_path, group.pids())
        return group.run(stop, on_failure, node_rank=node_rank, host=world.host(node_rank))
    finally:
        group.close()
        if pid_path and os.path.exists(pid_path):
            os.remove(pid_path)


def build_parser() -> argparse.ArgumentParser:
    """The per-node launcher's flags (set by the runner, not by users)."""
    parser = argparse.ArgumentParser(prog="python -m deepscale.launcher.launch", allow_abbrev=False,
                                     description="deepscale per-node launcher (started by the deepscale runner)")
    parser.add_argument("--world_info", required=True, help="encoded hosts and slots (from the runner)")
    parser.add_argument("--node_rank", type=int, default=-1, help="this node's rank")
    parser.add_argument("--node_host", default=None, help="this node's hostfile name (pdsh %%h), checks --node_rank")
    parser.add_argument("--node_rank_env", default=None,
                        help="take the node rank from this variable (OMPI_COMM_WORLD_RANK, PMI_RANK) or, for "
                             "SLURMD_NODENAME, from this node's position in the world")
    parser.add_argument("--master_addr", required=True)
    parser.add_argument("--master_port", type=int, required=True)
    parser.add_argument("--controller", default=None, help="host:port of the runner's job controller")
    parser.add_argument("--job_token", default=os.environ.get("DEEPSCALE_JOB_TOKEN", ""))
    parser.add_argument("--no_python", action="store_true")
    parser.add_argument("--module", action="store_true")
    parser.add_argument("--no_local_rank", action="store_true")
    parser.add_argument("--log_dir", default=None)
    parser.add_argument("--bind_cores_to_rank", action="store_true")
    parser.add_argument("--bind_core_list", default=None)
    parser.add_argument("--rank_prefix", action="store_true")
    parser.add_argument("--restart_count", type=int, default=0)
    parser.add_argument("--save_pid", type=int, default=None, help="the runner's pid, names the pid file")
    parser.add_argument("user_script")
    parser.add_argument("user_args", nargs=argparse.REMAINDER)
    return parser


def resolve_node_rank(args: argparse.Namespace, world: WorldInfo, environ=None) -> int:
    """This node's rank: given explicitly, or read from the variable the MPI/Slurm launcher sets.

    Raises:
        ValueError: no usable source, or the value is out of range.
    """
    environ = os.environ if environ is None else environ
    node_rank = args.node_rank
    if node_rank < 0 and args.node_rank_env:
        value = environ.get(args.node_rank_env)
        if value is None:
            raise ValueError(f"--node_rank_env {args.node_rank_env} is not set on this node")
        if args.node_rank_env == "SLURMD_NODENAME":
            if value not in world.hosts:
                raise ValueError(f"Slurm node {value!r} is not one of the job's hosts: {', '.join(world.hosts)}")
            node_rank = world.hosts.index(value)
        else:
            node_rank = int(value)
    elif node_rank >= 0 and args.node_host and world.hosts[node_rank] != args.node_host \
            and args.node_host in world.hosts:
        node_rank = world.hosts.index(args.node_host)  # trust the name pdsh substituted over its position
    if not 0 <= node_rank < world.num_nodes:
        raise ValueError(f"node rank {node_rank} is out of range for {world.num_nodes} node(s); "
                         "pass --node_rank or --node_rank_env")
    return node_rank


def _failure_message(failure: Failure) -> dict:
    return {"type": "failure", "rank": failure.rank, "exit_code": failure.exit_code, "tail": failure.tail,
            "primary": failure.primary, "exit_time": failure.exit_time, "node_rank": failure.node_rank,
            "host": failure.host}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the per-node launcher; returns the node's exit code."""
    args = build_parser().parse_args(argv)
    world = WorldInfo.decode(args.world_info)
    stop = StopRequest()
    previous = install_handlers(stop)
    client = None
    try:
        node_rank = resolve_node_rank(args, world)
        host = world.host(node_rank)
        if args.controller:
            from deepscale.launcher.control import ControlClient
            client = ControlClient(args.controller, args.job_token, node_rank, host, stop)
        script = ScriptSpec(args.user_script, args.user_args, args.no_python, args.module, args.no_local_rank)
        options = NodeOptions(args.log_dir, args.bind_cores_to_rank, args.bind_core_list, args.restart_count,
                              args.save_pid, args.rank_prefix)
        report = (lambda f: client.send(_failure_message(f))) if client else None
        try:
            outcome = run_node(world, node_rank, args.master_addr, args.master_port, script, options, stop, report)
        except (ValueError, RuntimeError) as err:
            if client:
                client.send({"type": "error", "host": host, "message": str(err)})
            raise
        if outcome.failure is not None and client is None:
            print(f"deepscale: {outcome.failure.describe()}; its last lines:\n{format_tail(outcome.failure.tail)}",
                  file=sys.stderr, flush=True)
        if client:
            client.send({"type": "done", "exit_code": outcome.exit_code})
        return outcome.exit_code
    except (ValueError, RuntimeError) as err:
        print(f"deepscale launch: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if client:
            client.close()
        restore_handlers(previous)


if __name__ == "__main__":
    sys.exit(main())
