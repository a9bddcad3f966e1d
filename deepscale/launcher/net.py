"""Small socket helpers: is a port free, which local address the nodes can reach."""
import os
import socket
from typing import Iterable, Optional

from deepscale.launcher.constants import CONTROLLER_ADDR_VAR


def port_in_use(port: int, host: str = "") -> bool:
    """True when a TCP listener already holds ``port`` (``host`` ``""`` means all addresses).

    SO_REUSEADDR is set, as torch's TCPStore does, so sockets in TIME_WAIT do not count.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        return False
    except OSError:
        return True
    finally:
        sock.close()


def check_master_port(port: int, where: str = "this host") -> None:
    """Raise a clear error when ``--master_port`` is already taken."""
    if not 0 < port < 65536:
        raise ValueError(f"--master_port must be between 1 and 65535, got {port}")
    if port_in_use(port):
        raise ValueError(f"--master_port {port} is already in use on {where}; pick a free port with --master_port")


def _route_source(host: str) -> Optional[str]:
    # connect() on a UDP socket sends nothing; it only asks the kernel which local address
    # would be used to reach ``host``, which is the address that host can reach us at.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, 9))
            return sock.getsockname()[0]
    except OSError:
        return None


def controller_address(candidates: Iterable[str]) -> str:
    """The address the node launchers use to reach the runner.

    ``$DEEPSCALE_CONTROLLER_ADDR`` wins; otherwise the local address on the route to the
    first resolvable candidate host; otherwise this host's name.
    """
    explicit = os.environ.get(CONTROLLER_ADDR_VAR)
    if explicit:
        return explicit
    for host in candidates:
        source = _route_source(host)
        if source:
            return source
    return socket.gethostname()

