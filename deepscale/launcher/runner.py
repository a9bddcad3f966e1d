"""The ``deepscale`` command: ``deepscale [options] script.py [script args]``.

On one node the runner starts the ranks itself. On several nodes (or with ``--force_multi``)
it starts a job controller, then one per-node launcher on every node through the chosen
``--launcher``, and waits for the job's verdict. ``--max_restarts`` reruns a failed job.
``deepscale report`` prints the environment report (``deepscale.env_report``); ``deepscale plot
DIR`` draws a CSV monitor directory (``deepscale.monitor.plot``).
"""
import importlib
import os
import secrets
import shlex
import sys
from typing import List, Optional

from deepscale.launcher.arguments import parse_args
# DEEPSPEED_ENVIRONMENT_NAME: DeepSpeed clients (Accelerate) import it from here.
from deepscale.launcher.constants import (CONTROLLER_PORT_VAR, DEEPSPEED_ENVIRONMENT_NAME,  # noqa: F401
                                         DEFAULT_PID_DIR, PID_DIR_VAR)
from deepscale.launcher.job_plan import JobPlan, local_dry_run_lines, plan_job
from deepscale.launcher.launch import NodeOptions, run_node
from deepscale.launcher.output import format_tail
from deepscale.launcher.signals import StopRequest, install_handlers, restore_handlers
from deepscale.launcher.spawner import kill_grace_s
from deepscale.launcher.supervisor import JobResult
from deepscale.utils.logging import logger


def _node_options(plan: JobPlan, attempt: int) -> NodeOptions:
    args = plan.args
    return NodeOptions(args.log_dir, args.bind_cores_to_rank, args.bind_core_list, attempt,
                       os.getpid() if args.save_pid else None, args.rank_prefix)


def node_launcher_args(plan: JobPlan, attempt: int, controller: str, token: str) -> List[str]:
    """Flags of every per-node launcher after the node-rank and master flags, ending with the script."""
    args = plan.args
    flags = [f"--controller={controller}", f"--job_token={token}", f"--restart_count={attempt}"]
    for name in ("no_python", "module", "no_local_rank", "bind_cores_to_rank", "rank_prefix"):
        if getattr(args, name):
            flags.append(f"--{name}")
    if args.bind_core_list:
        flags.append(f"--bind_core_list={args.bind_core_list}")
    if args.log_dir:
        flags.append(f"--log_dir={args.log_dir}")
    if args.save_pid:
        flags.append(f"--save_pid={os.getpid()}")
    return flags + [args.user_script] + list(args.user_args)


def _job_launch(plan: JobPlan, attempt: int, controller: str, token: str):
    from deepscale.launcher.multinode_runner import JobLaunch
    args = plan.args
    return JobLaunch(plan.world, plan.master_addr, args.master_port,
                     node_launcher_args(plan, attempt, controller, token), plan.exports,
                     shlex.split(args.launcher_args), args.ssh_port, os.getcwd(), sys.executable)


def multinode_dry_run_lines(plan: JobPlan) -> List[str]:
    """What ``--dry_run`` prints for a multi-node job: the transport commands and each node's command.

    The controller address, port and token are chosen at launch; placeholders stand in for them.
    """
    from deepscale.launcher.multinode_runner import get_runner
    runner = get_runner(plan.args.launcher, _job_launch(plan, 0, "<controller_addr>:<port>", "<token>"))
    program = runner.program() or runner.programs[0]
    lines = [f"# deepscale dry run: {plan.world.num_nodes} node(s), {plan.world.world_size} rank(s), "
             f"--launcher {runner.name}; master {plan.master_addr}:{plan.args.master_port}"]
    for transport in runner.transports(program):
        for path, text in transport.files.items():
            lines.append(f"# helper file {path}:\n" + "\n".join("#   " + t for t in text.splitlines()))
        lines.append(transport.shell_line())
    return lines + runner.node_lines()


def run_local(plan: JobPlan, attempt: int, stop: StopRequest) -> JobResult:
    """Run this node's ranks in this process's children (a one-node job, or one node of a --no_ssh job)."""
    outcome = run_node(plan.world, plan.node_rank, plan.master_addr, plan.args.master_port, plan.script,
                       _node_options(plan, attempt), stop)
    if outcome.failure is not None and outcome.failure.primary:
        return JobResult(outcome.exit_code,
                         f"{outcome.failure.describe()}; its last output lines:\n{format_tail(outcome.failure.tail)}")
    if outcome.exit_code:
        return JobResult(outcome.exit_code, f"stopped by {stop.reason}")
    return JobResult(0)


def run_multinode(plan: JobPlan, attempt: int, stop: StopRequest) -> JobResult:
    """Start the controller and the per-node launchers, then supervise them."""
    from deepscale.launcher.control import JobController
    from deepscale.launcher.multinode_runner import get_runner, remove_helper_files, write_helper_files
    from deepscale.launcher.net import controller_address
    from deepscale.launcher.supervisor import RunningTransport, Supervisor

    probe = get_runner(plan.args.launcher, _job_launch(plan, attempt, "x:0", ""))
    program = probe.check_installed()
    token = secrets.token_hex(16)
    controller = JobController(plan.world.num_nodes, token, port=int(os.environ.get(CONTROLLER_PORT_VAR, "0")))
    address = f"{controller_address([plan.world.hosts[0], plan.master_addr])}:{controller.port}"
    transports = get_runner(plan.args.launcher, _job_launch(plan, attempt, address, token)).transports(program)
    started = []
    try:
        for transport in transports:
            write_helper_files(transport)
            logger.info(f"starting {transport.label}: {shlex.join(transport.argv)[:300]}")
            started.append(RunningTransport(transport))
        return Supervisor(controller, started, stop, kill_grace_s()).run()
    finally:
        controller.close()
        for transport in transports:
            remove_helper_files(transport)


def run_with_restarts(plan: JobPlan) -> int:
    """Run the job, restarting it after a failure up to ``--max_restarts`` times; returns the exit code."""
    args = plan.args
    run = run_multinode if plan.multi_node else run_local
    for attempt in range(args.max_restarts + 1):
        stop = StopRequest()
        previous = install_handlers(stop)
        try:
            result = run(plan, attempt, stop)
        finally:
            restore_handlers(previous)
        if result.exit_code == 0:
            return 0
        print(f"deepscale: {result.message}", file=sys.stderr, flush=True)
        if stop.from_user or attempt == args.max_restarts:
            print(f"deepscale: all ranks stopped; exit code {result.exit_code}", file=sys.stderr, flush=True)
            return result.exit_code
        logger.warning(f"job failed with exit code {result.exit_code}; restart {attempt + 1} of {args.max_restarts}")
    return 1  # not reached


def _dispatch_report(argv: List[str]) -> int:
    module = importlib.import_module("deepscale.env_report")
    saved = sys.argv
    sys.argv = ["deepscale report"] + argv
    try:
        code = module.main()
    finally:
        sys.argv = saved
    return int(code or 0)


def _write_runner_pid() -> str:
    path = os.path.join(os.environ.get(PID_DIR_VAR, DEFAULT_PID_DIR), f"{os.getpid()}.deepscale")
    with open(path, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``deepscale`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return _dispatch_report(argv[1:])
    if argv[:1] == ["plot"]:  # imported only here: it needs matplotlib (not torch)
        return importlib.import_module("deepscale.monitor.plot").main(argv[1:])
    args = parse_args(argv)
    if args.version:
        from deepscale.version import __version__
        print(f"deepscale {__version__}")
        return 0
    pid_path = None
    try:
        plan = plan_job(args)
        if args.dry_run:
            print("\n".join(multinode_dry_run_lines(plan) if plan.multi_node else local_dry_run_lines(plan)))
            return 0
        if args.save_pid:
            pid_path = _write_runner_pid()
        logger.info(f"{plan.world.num_nodes} node(s), {plan.world.world_size} rank(s): "
                    + ", ".join(f"{h}:{plan.world.slots[h]}" for h in plan.world.hosts))
        return run_with_restarts(plan)
    except ValueError as err:
        print(f"deepscale: error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:
        print(f"deepscale: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if pid_path and os.path.exists(pid_path):
            os.remove(pid_path)


if __name__ == "__main__":
    sys.exit(main())
