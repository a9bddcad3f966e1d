"""Command-line flags of the ``deepscale`` runner (DeepSpeed-compatible names)."""
import argparse
from typing import List, Optional

from deepscale.launcher.constants import DEFAULT_HOSTFILE, DEFAULT_LAUNCHER, DEFAULT_MASTER_PORT, LAUNCHERS

_DESCRIPTION = ("Start a deepscale training job on this node or on the nodes of a hostfile. "
                "Every rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT, "
                "CROSS_RANK and CROSS_SIZE, and --local_rank=<i> unless --no_local_rank. "
                "'deepscale report' prints the environment report instead.")


def build_parser() -> argparse.ArgumentParser:
    """The runner's argument parser."""
    parser = argparse.ArgumentParser(prog="deepscale", description=_DESCRIPTION, allow_abbrev=False)
    nodes = parser.add_argument_group("nodes and ranks")
    nodes.add_argument("-H", "--hostfile", default=DEFAULT_HOSTFILE,
                       help="lines 'hostname slots=N'; without it (when the default is missing) the job runs "
                            f"on this node only. Default {DEFAULT_HOSTFILE}")
    nodes.add_argument("-i", "--include", default="", help="use only these hosts/slots, e.g. 'host1:0,2@host2'")
    nodes.add_argument("-e", "--exclude", default="", help="leave out these hosts/slots, e.g. 'host1:1@host3'")
    nodes.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts (default: all)")
    nodes.add_argument("--num_gpus", "--num_accelerators", dest="num_gpus", type=int, default=-1,
                       help="ranks per node; on a node without GPUs these are CPU ranks "
                            "(default: the hostfile's slots, else the GPU count, else 1)")
    nodes.add_argument("--num_procs", type=int, default=-1, help="ranks per node, for CPU ranks (same as --num_gpus)")
    nodes.add_argument("--master_addr", default="",
                       help="address of rank 0 (default: 127.0.0.1 on one node, else the first host)")
    nodes.add_argument("--master_port", type=int, default=DEFAULT_MASTER_PORT,
                       help=f"port of rank 0's rendezvous store. Default {DEFAULT_MASTER_PORT}")

    multi = parser.add_argument_group("multi-node")
    multi.add_argument("--launcher", type=str.lower, choices=LAUNCHERS, default=DEFAULT_LAUNCHER,
                       help=f"how to start the per-node launchers. Default {DEFAULT_LAUNCHER}")
    multi.add_argument("--launcher_args", default="",
                       help="extra arguments for the launcher program (ssh options for --launcher ssh)")
    multi.add_argument("--ssh_port", type=int, default=None, help="ssh port of the nodes (ssh, pdsh, openmpi, mpich)")
    multi.add_argument("--force_multi", action="store_true",
                       help="use the multi-node path even for a single node")
    multi.add_argument("--no_ssh", action="store_true",
                       help="start only this node's ranks (run deepscale on every node yourself, with --node_rank)")
    multi.add_argument("--node_rank", type=int, default=-1, help="this node's index in the hostfile, with --no_ssh")
    multi.add_argument("--no_ssh_check", action="store_true",
                       help="accepted for DeepSpeed compatibility; deepscale does no separate ssh check")

    ranks = parser.add_argument_group("what each rank runs")
    ranks.add_argument("--no_python", action="store_true", help="run the script directly, not through Python")
    ranks.add_argument("-m", "--module", action="store_true", help="run the script as a module (python -m)")
    ranks.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank=<i> to the script")
    ranks.add_argument("--bind_cores_to_rank", action="store_true",
                       help="bind each rank to its own share of the node's cores (sets OMP_NUM_THREADS)")
    ranks.add_argument("--bind_core_list", default=None,
                       help="cores to share out with --bind_cores_to_rank, e.g. '0-15,32-47' (default: all)")
    ranks.add_argument("--rank_prefix", action="store_true",
                       help="start every line a rank prints on the console with '[rank R] '")
    ranks.add_argument("--log_dir", "--enable_each_rank_log", dest="log_dir", default=None,
                       help="write each rank's output to <log_dir>/rank<r>.log on its node")

    job = parser.add_argument_group("job control")
    job.add_argument("--max_restarts", type=int, default=0,
                     help="restart the whole job up to N times after a failure (DEEPSCALE_RESTART_COUNT tells "
                          "the script which attempt it is). Default 0")
    job.add_argument("--save_pid", action="store_true",
                     help="write the runner's pid to /tmp/<pid>.deepscale and each node launcher's pids to "
                          "/tmp/<runner pid>.node<k>.deepscale while the job runs")
    job.add_argument("--dry_run", action="store_true", help="print the commands each node would run, then exit")
    job.add_argument("--version", action="store_true", help="print the deepscale version and exit")

    parser.add_argument("user_script", nargs="?", help="the training script (or module, or program)")
    parser.add_argument("user_args", nargs=argparse.REMAINDER, help="arguments for the training script")
    return parser


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check values argparse cannot; merges ``--num_procs`` into ``args.num_gpus``.

    Raises:
        ValueError: naming the flag and the allowed values.
    """
    if args.num_procs != -1 and args.num_gpus != -1 and args.num_procs != args.num_gpus:
        raise ValueError(f"--num_gpus {args.num_gpus} and --num_procs {args.num_procs} disagree; give one of them")
    if args.num_procs != -1:
        args.num_gpus = args.num_procs
    for flag in ("num_nodes", "num_gpus"):
        value = getattr(args, flag)
        if value == 0 or value < -1:
            raise ValueError(f"--{flag} must be a positive integer, got {value}")
    if (args.num_nodes != -1 or args.num_gpus != -1) and (args.include or args.exclude):
        raise ValueError("--num_nodes/--num_gpus/--num_procs cannot be combined with --include/--exclude; "
                         "name the slots in --include instead")
    if args.module and args.no_python:
        raise ValueError("--module and --no_python cannot be used together")
    if args.max_restarts < 0:
        raise ValueError(f"--max_restarts must be >= 0, got {args.max_restarts}")
    for flag in ("master_port", "ssh_port"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 65536:
            raise ValueError(f"--{flag} must be between 1 and 65535, got {value}")
    if args.no_ssh and args.node_rank < 0:
        raise ValueError("--no_ssh needs --node_rank (this node's index in the hostfile, from 0)")
    if args.node_rank >= 0 and not args.no_ssh:
        raise ValueError("--node_rank is only used with --no_ssh")
    if args.bind_core_list and not args.bind_cores_to_rank:
        raise ValueError("--bind_core_list needs --bind_cores_to_rank")
    if not args.user_script and not args.version:
        raise ValueError("missing the training script: deepscale [options] script.py [script args]")
    return args


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and validate the runner's command line; bad values exit with a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return validate_args(args)
    except ValueError as err:
        parser.error(str(err))
