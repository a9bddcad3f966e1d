"""How the runner starts one per-node launcher on every node: pdsh, ssh, OpenMPI, MPICH, Slurm.

Each backend turns the same per-node command (``python -u -m deepscale.launcher.launch ...``)
into the program invocations that run it once per node, and says which Debian package
provides its program when that program is missing.
"""
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from deepscale.launcher.constants import MPICH, OPENMPI, PDSH, SLURM, SSH, SSH_ARGS_VAR
from deepscale.launcher.world import WorldInfo


@dataclass
class JobLaunch:
    """Everything a backend needs to build its commands.

    Args:
        world: hosts and slots.
        master_addr, master_port: rank 0's rendezvous address.
        node_args: per-node launcher flags shared by all nodes (script, options, controller).
        exports: environment exported to every node.
        launcher_args: the user's ``--launcher_args``, already split.
        ssh_port: ``--ssh_port`` or None.
        cwd: working directory on every node.
        python: interpreter on every node.
    """
    world: WorldInfo
    master_addr: str
    master_port: int
    node_args: List[str]
    exports: Dict[str, str]
    launcher_args: List[str] = field(default_factory=list)
    ssh_port: Optional[int] = None
    cwd: str = field(default_factory=os.getcwd)
    python: str = sys.executable

    def node_command(self, rank_args: List[str]) -> List[str]:
        """argv of the per-node launcher with the node-rank flags ``rank_args``."""
        return ([self.python, "-u", "-m", "deepscale.launcher.launch", f"--world_info={self.world.encode()}"]
                + rank_args + [f"--master_addr={self.master_addr}", f"--master_port={self.master_port}"]
                + self.node_args)

    def ssh_options(self) -> List[str]:
        """ssh options every ssh-based backend passes on: ``-p`` and ``$DEEPSCALE_SSH_ARGS``."""
        options = ["-p", str(self.ssh_port)] if self.ssh_port else []
        return options + shlex.split(os.environ.get(SSH_ARGS_VAR, ""))

    def remote_shell_command(self, rank_args: List[str]) -> str:
        """A shell line for ssh/pdsh: same directory, exported environment, then the launcher."""
        parts = [f"cd {shlex.quote(self.cwd)}"]
        if self.exports:
            parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in self.exports.items()))
        parts.append("exec " + shlex.join(self.node_command(rank_args)))
        return " && ".join(parts)


@dataclass
class Transport:
    """One program the runner starts; it runs the per-node launchers of ``node_ranks``."""
    argv: List[str]
    env: Dict[str, str]
    node_ranks: List[int]
    label: str
    files: Dict[str, str] = field(default_factory=dict)  # helper files to write first: path -> text

    def shell_line(self) -> str:
        """The transport as one shell line, environment first (for --dry_run)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


class MultiNodeRunner:
    """Base of the backends. Subclasses set ``name``, ``programs``, ``package`` and ``transports``."""
    name = ""
    programs: tuple = ()
    package = ""

    def __init__(self, job: JobLaunch):
        self.job = job

    def program(self) -> Optional[str]:
        """The first installed program of ``programs``, or None."""
        for candidate in self.programs:
            if shutil.which(candidate):
                return candidate
        return None

    def check_installed(self) -> str:
        """The program to run; raises RuntimeError naming the package when none is installed."""
        found = self.program()
        if found is None:
            raise RuntimeError(f"--launcher {self.name} needs {' or '.join(self.programs)}, which is not installed "
                               f"on this host; install the '{self.package}' package (e.g. apt-get install "
                               f"{self.package}) or choose another --launcher")
        return found

    def transports(self, program: str) -> List[Transport]:
        """The programs to start, given the installed ``program``."""
        raise NotImplementedError

    def node_lines(self) -> List[str]:
        """For --dry_run: what each node runs."""
        return [f"# node {i} ({host}) runs: {self.node_view(i)}" for i, host in enumerate(self.job.world.hosts)]

    def node_view(self, node_rank: int) -> str:
        """The command node ``node_rank`` runs, as one line."""
        return shlex.join(self.job.node_command(self.rank_args(node_rank)))

    def rank_args(self, node_rank: int) -> List[str]:
        """Per-node launcher flags telling node ``node_rank`` who it is."""
        return [f"--node_rank={node_rank}"]


class PDSHRunner(MultiNodeRunner):
    """``pdsh -w host1,host2 '<cmd> --node_rank=%n --node_host=%h'``: one ssh fan-out for all nodes."""
    name, programs, package = PDSH, ("pdsh",), "pdsh"

    def node_view(self, node_rank: int) -> str:
        host = self.job.world.host(node_rank)
        return self.job.remote_shell_command([f"--node_rank={node_rank}", f"--node_host={host}"])

    def transports(self, program: str) -> List[Transport]:
        # pdsh expands %n (position in -w) and %h; escape every other '%' in the command.
        command = self.job.remote_shell_command(["--node_rank=@N@", "--node_host=@H@"]).replace("%", "%%")
        command = command.replace("@N@", "%n").replace("@H@", "%h")
        env = {"PDSH_RCMD_TYPE": os.environ.get("PDSH_RCMD_TYPE", "ssh")}
        ssh_options = self.job.ssh_options()
        if ssh_options:
            current = os.environ.get("PDSH_SSH_ARGS_APPEND", "")
            env["PDSH_SSH_ARGS_APPEND"] = (current + " " + shlex.join(ssh_options)).strip()
        argv = ([program, "-S", "-f", "1024", "-w", ",".join(self.job.world.hosts)]
                + self.job.launcher_args + [command])
        return [Transport(argv, env, list(range(self.job.world.num_nodes)), "pdsh")]


class SSHRunner(MultiNodeRunner):
    """One ``ssh host '<cmd> --node_rank=i'`` per node; ``--launcher_args`` are ssh options."""
    name, programs, package = SSH, ("ssh",), "openssh-client"

    def node_view(self, node_rank: int) -> str:
        return self.job.remote_shell_command(self.rank_args(node_rank))

    def transports(self, program: str) -> List[Transport]:
        result = []
        for node_rank, host in enumerate(self.job.world.hosts):
            argv = ([program] + self.job.ssh_options() + self.job.launcher_args
                    + [host, self.job.remote_shell_command(self.rank_args(node_rank))])
            result.append(Transport(argv, {}, [node_rank], f"ssh {host}"))
        return result


def _version_mentions(program: str, words: tuple) -> bool:
    # Both MPIs install a plain "mpirun" alternative; its --version tells which one it is.
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    text = out.stdout + out.stderr
    return any(word in text for word in words)


class OpenMPIRunner(MultiNodeRunner):
    """``mpirun -n <nodes> --host h1:1,h2:1 --map-by node``: one launcher per node, rank = node rank."""
    name, programs, package = OPENMPI, ("mpirun.openmpi", "mpirun"), "openmpi-bin"
    version_words = ("Open MPI", "OpenRTE")

    def node_view(self, node_rank: int) -> str:
        return f"{super().node_view(node_rank)}  (node rank {node_rank} = MPI rank)"

    def program(self) -> Optional[str]:
        for candidate in self.programs:
            if shutil.which(candidate) and (candidate != "mpirun" or _version_mentions(candidate, self.version_words)):
                return candidate
        return None

    def rank_args(self, node_rank: int) -> List[str]:
        return ["--node_rank_env=OMPI_COMM_WORLD_RANK"]

    def transports(self, program: str) -> List[Transport]:
        hosts = self.job.world.hosts
        argv = [program, "-n", str(len(hosts)), "--host", ",".join(f"{h}:1" for h in hosts),
                "--map-by", "node", "--bind-to", "none", "--wdir", self.job.cwd]
        env = {}
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
            env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        ssh_options = self.job.ssh_options()
        if ssh_options:
            argv += ["--mca", "plm_rsh_args", shlex.join(ssh_options)]
        for key, value in self.job.exports.items():
            argv += ["-x", f"{key}={value}"]
        argv += self.job.launcher_args + self.job.node_command(self.rank_args(0))
        return [Transport(argv, env, list(range(len(hosts))), "mpirun (OpenMPI)")]


class MPICHRunner(MultiNodeRunner):
    """``mpirun.mpich -n <nodes> -ppn 1 -hosts h1,h2``; ssh options go through a small wrapper script
    because Hydra's ``-launcher-exec`` takes a program, not a command line."""
    name, programs, package = MPICH, ("mpirun.mpich", "mpiexec.hydra", "mpiexec.mpich", "mpirun"), "mpich"
    version_words = ("HYDRA",)
    program = OpenMPIRunner.program

    def rank_args(self, node_rank: int) -> List[str]:
        return ["--node_rank_env=PMI_RANK"]

    def transports(self, program: str) -> List[Transport]:
        hosts = self.job.world.hosts
        argv = [program, "-n", str(len(hosts)), "-ppn", "1", "-hosts", ",".join(hosts), "-wdir", self.job.cwd]
        files = {}
        ssh_options = self.job.ssh_options()
        if ssh_options:
            wrapper = os.path.join(tempfile.gettempdir(), f"deepscale-ssh-{os.getpid()}.sh")
            files[wrapper] = f"#!/bin/sh\nexec ssh {shlex.join(ssh_options)} \"$@\"\n"
            argv += ["-launcher", "ssh", "-launcher-exec", wrapper]
        for key, value in self.job.exports.items():
            argv += ["-genv", key, value]
        argv += self.job.launcher_args + self.job.node_command(self.rank_args(0))
        return [Transport(argv, {}, list(range(len(hosts))), "mpirun (MPICH)", files)]


class SlurmRunner(MultiNodeRunner):
    """``srun --nodes N --ntasks-per-node 1 --nodelist ...``; each launcher finds its node rank from
    ``SLURMD_NODENAME``, so the hostfile must name the Slurm nodes."""
    name, programs, package = SLURM, ("srun",), "slurm-client"

    def rank_args(self, node_rank: int) -> List[str]:
        return ["--node_rank_env=SLURMD_NODENAME"]

    def transports(self, program: str) -> List[Transport]:
        hosts = self.job.world.hosts
        argv = [program, f"--nodes={len(hosts)}", f"--ntasks={len(hosts)}", "--ntasks-per-node=1",
                f"--nodelist={','.join(hosts)}", f"--chdir={self.job.cwd}", "--export=ALL", "--cpu-bind=none"]
        argv += self.job.launcher_args + self.job.node_command(self.rank_args(0))
        # srun hands its own environment to the tasks (--export=ALL), so the exports go there.
        return [Transport(argv, dict(self.job.exports), list(range(len(hosts))), "srun")]


RUNNERS = {cls.name: cls for cls in (PDSHRunner, SSHRunner, OpenMPIRunner, MPICHRunner, SlurmRunner)}


def get_runner(name: str, job: JobLaunch) -> MultiNodeRunner:
    """The backend for ``--launcher name``."""
    if name not in RUNNERS:
        raise ValueError(f"--launcher {name!r} is not supported; allowed values: {', '.join(RUNNERS)}")
    return RUNNERS[name](job)


def write_helper_files(transport: Transport) -> None:
    """Write a transport's helper files (executable scripts)."""
    for path, text in transport.files.items():
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, stat.S_IRWXU)


def remove_helper_files(transport: Transport) -> None:
    """Delete what :func:`write_helper_files` wrote."""
    for path in transport.files:
        if os.path.exists(path):
            os.remove(path)
