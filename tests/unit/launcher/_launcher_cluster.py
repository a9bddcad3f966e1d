"""Test fixtures that stand up real cluster services on loopback addresses.

* ``sshd_server``: an sshd on a free port listening on 127.0.0.1-3, accepting a key pair
  generated for the test (so ssh, pdsh, OpenMPI and MPICH reach "nodes" 127.0.0.2/3).
* ``slurm_cluster``: slurmctld plus two slurmd (nodes ``dsnode1``/``dsnode2`` at
  127.0.0.2/3) with auth/none, so no munge key is needed. Needs root.
"""
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from _launcher_helpers import NODES, SSH_CLIENT_OPTIONS, free_port, stop_process_group, wait_for


def _find_sshd():
    found = shutil.which("sshd")
    if found:
        return found
    return "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None


@dataclass
class SSHServer:
    port: int
    key: str

    @property
    def client_options(self) -> str:
        """ssh options a client needs to log in (everything but the port)."""
        return f"{SSH_CLIENT_OPTIONS} -i {self.key}"


def _port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    sshd = _find_sshd()
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs openssh-server and openssh-client (sshd, ssh, ssh-keygen)")
    folder = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    os.chmod(folder / "user_key", 0o600)
    port = free_port()
    config = folder / "sshd_config"
    listen = "".join(f"ListenAddress {addr}\n" for addr in ("127.0.0.1",) + NODES)
    config.write_text(
        f"Port {port}\n{listen}HostKey {folder / 'host_key'}\nPermitRootLogin yes\n"
        f"AuthorizedKeysFile {folder / 'user_key.pub'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {folder / 'sshd.pid'}\n"
        f"MaxStartups 100\nMaxSessions 100\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    log = open(folder / "sshd.log", "w")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        if not wait_for(lambda: all(_port_open(h, port) for h in NODES) or proc.poll() is not None, 10):
            pytest.skip(f"sshd did not start: {(folder / 'sshd.log').read_text()[-500:]}")
        if proc.poll() is not None:
            pytest.skip(f"sshd exited at start: {(folder / 'sshd.log').read_text()[-500:]}")
        server = SSHServer(port, str(folder / "user_key"))
        check = subprocess.run(["ssh", "-p", str(port)] + server.client_options.split() + [NODES[0], "true"],
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if check.returncode != 0:
            # sshd runs but refuses the test key: with the packages present that is a real failure.
            pytest.fail(f"cannot ssh to {NODES[0]}:{port}: {check.stderr}\n{(folder / 'sshd.log').read_text()}")
        yield server
    finally:
        stop_process_group(proc)
        log.close()


@dataclass
class SlurmCluster:
    conf: str
    nodes: tuple


_SLURM_CONF = """\
ClusterName=deepscaletest
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=2
MinJobAge=5
InactiveLimit=0
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
NodeName=dsnode1 NodeHostname={hostname} NodeAddr=127.0.0.2 Port={node1_port} CPUs=2 State=UNKNOWN
NodeName=dsnode2 NodeHostname={hostname} NodeAddr=127.0.0.3 Port={node2_port} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=dsnode1,dsnode2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _slurm_nodes_idle(env):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env, timeout=10)
    states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
    return states.get("dsnode1") == "idle" and states.get("dsnode2") == "idle"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = [p for p in ("slurmctld", "slurmd", "srun", "sinfo") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs slurm-wlm ({', '.join(missing)} missing)")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd starts the tasks)")
    folder = tmp_path_factory.mktemp("slurm")
    (folder / "state").mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(_SLURM_CONF.format(hostname=socket.gethostname(), folder=folder, ctld_port=free_port(),
                                       slurmd_port=free_port(), node1_port=free_port(), node2_port=free_port()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    commands = [["slurmctld", "-D", "-f", str(conf)]] + [["slurmd", "-D", "-N", n, "-f", str(conf)]
                                                         for n in ("dsnode1", "dsnode2")]
    procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True) for cmd in commands]
    try:
        if not wait_for(lambda: _slurm_nodes_idle(env) or any(p.poll() is not None for p in procs), 30, 0.2) \
                or any(p.poll() is not None for p in procs):
            logs = "".join((folder / name).read_text()[-300:] for name in
                           ("slurmctld.log", "slurmd-dsnode1.log") if (folder / name).exists())
            pytest.skip(f"local Slurm cluster did not come up within 30 s: {logs}")
        yield SlurmCluster(str(conf), ("dsnode1", "dsnode2"))
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)
        time.sleep(0.1)
