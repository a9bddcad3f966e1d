"""The job controller: a small TCP channel between the runner and every per-node launcher.

Note: why a controller. ssh, pdsh, mpirun and srun each propagate failures and signals
differently (closing an ssh client does not stop the remote command). So every per-node
launcher connects back to the runner and the runner makes one decision for the job:
a node reports its first failing rank (code, exit time, last output lines); the runner
sends ``abort`` to all nodes, and each stops its ranks. The connection is also a lifeline:
a node that loses it stops its ranks, so a killed runner leaves nothing behind.

Messages are JSON objects, one per line. Node to runner: ``hello`` (with the job token),
``failure``, ``error``, ``done``. Runner to node: ``abort``.
"""
import json
import selectors
import signal
import socket
import threading
import time
from typing import Dict, List, Optional

from deepscale.launcher.signals import StopRequest


def _send(sock: socket.socket, lock: threading.Lock, message: dict) -> bool:
    data = (json.dumps(message) + "\n").encode("utf-8")
    with lock:
        try:
            sock.sendall(data)
            return True
        except OSError:
            return False


class JobController:
    """Runner side: accepts the node launchers and records what they report.

    Args:
        num_nodes: how many node launchers will connect.
        token: shared secret sent by each node in ``hello``; other connections are dropped.
        port: port to listen on; ``0`` picks a free one. Default 0.
        bind_host: address to listen on. Default ``"0.0.0.0"``.
    """

    def __init__(self, num_nodes: int, token: str, port: int = 0, bind_host: str = "0.0.0.0"):
        self.num_nodes = num_nodes
        self.token = token
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._server.bind((bind_host, port))
        except OSError as err:
            self._server.close()
            raise ValueError(f"the job controller cannot listen on {bind_host}:{port}: {err}") from err
        self._server.listen(max(16, num_nodes))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._nodes: Dict[int, socket.socket] = {}
        self.done: Dict[int, int] = {}
        self.lost: set = set()
        self.failures: List[dict] = []
        self.errors: List[str] = []
        self._abort: Optional[dict] = None
        self._closing = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- runner-facing API ------------------------------------------------------------------
    def abort(self, signum: int, reason: str, force: bool = False) -> None:
        """Tell every node (also ones connecting later) to stop its ranks with ``signum``.

        Only the first call is sent, unless ``force``: then the nodes kill their ranks at once.
        """
        with self._lock:
            first = self._abort is None
            if first:
                self._abort = {"type": "abort", "signal": int(signum), "reason": reason}
            if force:
                self._abort = dict(self._abort, force=True)
            nodes = list(self._nodes.values())
        if first or force:
            for sock in nodes:
                _send(sock, self._send_lock, self._abort)

    @property
    def aborted(self) -> bool:
        """True once :meth:`abort` was called."""
        return self._abort is not None

    def connected(self) -> set:
        """Node ranks with an open connection."""
        with self._lock:
            return set(self._nodes)

    def finished(self) -> set:
        """Nodes that reported ``done`` or dropped their connection."""
        with self._lock:
            return set(self.done) | set(self.lost)

    def first_failure(self) -> Optional[dict]:
        """The failure to report: the earliest primary one, else the earliest of any."""
        with self._lock:
            failures = list(self.failures)
        if not failures:
            return None
        primary = [f for f in failures if f.get("primary")]
        return min(primary or failures, key=lambda f: f.get("exit_time", 0.0))

    def close(self) -> None:
        """Stop serving and close every connection (the nodes take that as a stop)."""
        self._closing = True
        self._thread.join(timeout=2.0)
        for sock in list(self._nodes.values()):
            sock.close()
        self._server.close()

    # -- server loop --------------------------------------------------------------------------
    def _serve(self) -> None:
        buffers: Dict[socket.socket, bytes] = {}
        owners: Dict[socket.socket, int] = {}
        while not self._closing:
            for key, _ in self._selector.select(timeout=0.1):
                if key.fileobj is self._server:
                    conn, _ = self._server.accept()
                    buffers[conn] = b""
                    self._selector.register(conn, selectors.EVENT_READ, None)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._drop(conn, owners.pop(conn, None))
                    buffers.pop(conn, None)
                    continue
                buffers[conn] += data
                while b"\n" in buffers[conn]:
                    line, buffers[conn] = buffers[conn].split(b"\n", 1)
                    if not self._handle(conn, line, owners):
                        self._drop(conn, owners.pop(conn, None))
                        buffers.pop(conn, None)
                        break
        self._selector.close()

    def _drop(self, conn: socket.socket, node_rank: Optional[int]) -> None:
        self._selector.unregister(conn)
        conn.close()
        if node_rank is not None:
            with self._lock:
                self._nodes.pop(node_rank, None)
                if node_rank not in self.done:
                    self.lost.add(node_rank)

    def _handle(self, conn: socket.socket, line: bytes, owners: Dict[socket.socket, int]) -> bool:
        try:
            message = json.loads(line.decode("utf-8"))
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            return False
        if conn not in owners:
            if kind != "hello" or message.get("token") != self.token:
                return False  # not one of our node launchers
            node_rank = int(message["node_rank"])
            owners[conn] = node_rank
            with self._lock:
                self._nodes[node_rank] = conn
                pending_abort = self._abort
            if pending_abort is not None:
                _send(conn, self._send_lock, pending_abort)
            return True
        node_rank = owners[conn]
        with self._lock:
            if kind == "failure":
                self.failures.append(message)
            elif kind == "error":
                self.errors.append(f"node {node_rank} ({message.get('host', '?')}): {message.get('message', '')}")
            elif kind == "done":
                self.done[node_rank] = int(message.get("exit_code", 0))
        return True


class ControlClient:
    """Node side: connects to the controller, reports, and turns ``abort`` or a lost
    connection into a stop request.

    Args:
        address: ``host:port`` of the controller.
        token: the job token.
        node_rank: this node's rank.
        host: this node's name in the hostfile (for messages).
        stop: receives the stop requests.
        connect_timeout_s: how long to retry connecting. Default 30.
    """

    def __init__(self, address: str, token: str, node_rank: int, host: str, stop: StopRequest,
                 connect_timeout_s: float = 30.0):
        controller_host, _, port = address.rpartition(":")
        self.stop = stop
        self._send_lock = threading.Lock()
        self._closing = False
        self.sock = self._connect(controller_host, int(port), connect_timeout_s)
        self.send({"type": "hello", "token": token, "node_rank": node_rank, "host": host})
        self.host = host
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    @staticmethod
    def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=5.0)
                sock.settimeout(None)
                return sock
            except OSError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cannot reach the deepscale job controller at {host}:{port} ({err}); the nodes must "
                        f"reach the launching host: set DEEPSCALE_CONTROLLER_ADDR/DEEPSCALE_CONTROLLER_PORT") from err
                time.sleep(0.2)

    def send(self, message: dict) -> bool:
        """Send one message; False when the connection is gone."""
        return _send(self.sock, self._send_lock, message)

    def _listen(self) -> None:
        reader = self.sock.makefile("rb")
        for line in reader:
            try:
                message = json.loads(line.decode("utf-8"))
            except ValueError:
                continue
            if message.get("type") == "abort":
                self.stop.request(int(message.get("signal", signal.SIGTERM)), reason=message.get("reason", "aborted"),
                                  force=bool(message.get("force", False)))
        if not self._closing:
            self.stop.request(signal.SIGTERM, reason="lost the connection to the deepscale runner")

    def close(self) -> None:
        """Close after everything sent was delivered: half-close, then wait for the runner's EOF."""
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._thread.join(timeout=2.0)
        self.sock.close()
