"""Turns the runner's flags into a job plan: which hosts and slots, local or multi-node, and
what each node runs (also what ``--dry_run`` prints)."""
import argparse
import collections
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List

from deepscale.launcher.constants import DEFAULT_HOSTFILE, SLURM
from deepscale.launcher.devices import detect_gpu_count
from deepscale.launcher.env import collect_exports
from deepscale.launcher.hostfile import filter_resources, limit_resources, read_hostfile
from deepscale.launcher.spawner import ScriptSpec, build_rank_specs
from deepscale.launcher.threads import default_omp_threads
from deepscale.launcher.world import WorldInfo


@dataclass
class JobPlan:
    """The decided job.

    Args:
        args: the validated runner flags.
        world: the active hosts and slots.
        multi_node: start per-node launchers through ``args.launcher`` (else run the ranks here).
        master_addr: rank 0's address.
        script: what each rank runs.
        exports: environment exported to the other nodes.
        node_rank: the node run here when the ranks run in this process (``--no_ssh``). Default 0.
    """
    args: argparse.Namespace
    world: WorldInfo
    multi_node: bool
    master_addr: str
    script: ScriptSpec
    exports: Dict[str, str]
    node_rank: int = 0


def _slurm_pool(args: argparse.Namespace) -> "collections.OrderedDict[str, int]":
    # Inside an allocation the nodes come from Slurm itself; scontrol expands "node[01-04]".
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not shutil.which("scontrol"):
        raise RuntimeError("--launcher slurm without a hostfile needs scontrol; install 'slurm-client'")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise ValueError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}: {out.stderr.strip()}")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    if args.num_gpus > 0:
        slots = args.num_gpus
    elif per_node.isdigit() and int(per_node) > 0:
        slots = int(per_node)
    else:
        slots = detect_gpu_count() or 1
    return collections.OrderedDict((host, slots) for host in hosts)


def resource_pool(args: argparse.Namespace) -> "collections.OrderedDict[str, int]":
    """``host -> slots`` from the hostfile, the Slurm allocation, or this node alone.

    Inside a Slurm allocation with ``--launcher slurm`` and no hostfile, the nodes are the
    allocation's, with ``--num_gpus``, else ``$SLURM_NTASKS_PER_NODE``, else the GPU count ranks each.

    Raises:
        ValueError: a hostfile given with ``--hostfile`` is missing, or more nodes are asked than exist.
    """
    if os.path.exists(args.hostfile):
        return read_hostfile(args.hostfile)
    if args.hostfile != DEFAULT_HOSTFILE:
        raise ValueError(f"--hostfile {args.hostfile!r} does not exist")
    if args.launcher == SLURM and os.environ.get("SLURM_JOB_NODELIST"):
        return _slurm_pool(args)
    if args.num_nodes > 1:
        raise ValueError(f"--num_nodes {args.num_nodes} needs a hostfile, and --hostfile {args.hostfile} "
                         "does not exist")
    slots = args.num_gpus if args.num_gpus > 0 else (detect_gpu_count() or 1)
    return collections.OrderedDict([("localhost", slots)])


def plan_job(args: argparse.Namespace) -> JobPlan:
    """Decide hosts, slots, mode and master address from validated flags."""
    pool = resource_pool(args)
    active = filter_resources(pool, args.include, args.exclude)
    active = limit_resources(active, args.num_nodes, args.num_gpus)
    world = WorldInfo.from_resources(active)
    multi_node = (args.force_multi or world.num_nodes > 1) and not args.no_ssh
    if args.no_ssh:
        world.host(args.node_rank)  # raises when out of range
    spans_nodes = multi_node or (args.no_ssh and world.num_nodes > 1)
    master_addr = args.master_addr or (world.hosts[0] if spans_nodes else "127.0.0.1")
    if args.log_dir:
        args.log_dir = os.path.abspath(args.log_dir)
    script = ScriptSpec(args.user_script, list(args.user_args), args.no_python, args.module, args.no_local_rank,
                        python=sys.executable)
    if not multi_node and not args.module and not os.path.exists(args.user_script) \
            and not (args.no_python and shutil.which(args.user_script)):
        raise ValueError(f"the training script {args.user_script!r} does not exist")
    return JobPlan(args, world, multi_node, master_addr, script, collect_exports() if multi_node else {},
                   node_rank=max(args.node_rank, 0))


def local_dry_run_lines(plan: JobPlan) -> List[str]:
    """What ``--dry_run`` prints for a single-node job: each rank's variables and command."""
    args = plan.args
    local = plan.world.local_size(plan.node_rank)
    lines = [f"# deepscale dry run: 1 node (this host, node {plan.node_rank}), {local} rank(s)"]
    omp_threads = None if args.bind_cores_to_rank else default_omp_threads(os.environ, local)[0]
    specs = build_rank_specs(plan.world, plan.node_rank, plan.master_addr, args.master_port, plan.script, dict(os.environ),
                             args.log_dir, omp_threads=omp_threads)
    for spec in specs:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items())
        target = f" > {shlex.quote(spec.log_path)} 2>&1" if spec.log_path else ""
        lines.append(f"{env} {shlex.join(spec.cmd)}{target}")
    return lines
