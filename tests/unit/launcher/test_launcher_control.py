"""The job controller protocol between the runner and the per-node launchers (in-process, loopback)."""
import signal
import socket
import time

import pytest

from _launcher_helpers import wait_for
from deepscale.launcher.control import ControlClient, JobController
from deepscale.launcher.signals import StopRequest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def controller():
    ctl = JobController(num_nodes=2, token="secret", bind_host="127.0.0.1")
    yield ctl
    ctl.close()


def _client(ctl, node_rank, token="secret"):
    stop = StopRequest()
    return ControlClient(f"127.0.0.1:{ctl.port}", token, node_rank, f"host{node_rank}", stop), stop


def test_only_clients_with_the_token_are_accepted(controller):
    intruder = socket.create_connection(("127.0.0.1", controller.port))
    intruder.sendall(b'{"type": "hello", "token": "wrong", "node_rank": 0}\n')
    assert intruder.recv(100) == b""  # dropped
    intruder.close()
    client, _ = _client(controller, 1)
    assert wait_for(lambda: controller.connected() == {1}, 5)
    client.close()


def test_earliest_primary_failure_wins(controller):
    a, _ = _client(controller, 0)
    b, _ = _client(controller, 1)
    now = time.time()
    b.send({"type": "failure", "rank": 3, "exit_code": 1, "primary": True, "exit_time": now + 0.2, "node_rank": 1,
            "host": "host1", "tail": []})
    a.send({"type": "failure", "rank": 0, "exit_code": 143, "primary": False, "exit_time": now, "node_rank": 0,
            "host": "host0", "tail": []})
    a.send({"type": "failure", "rank": 1, "exit_code": 3, "primary": True, "exit_time": now + 0.1, "node_rank": 0,
            "host": "host0", "tail": ["boom"]})
    assert wait_for(lambda: len(controller.failures) == 3, 5)
    first = controller.first_failure()
    assert (first["rank"], first["exit_code"], first["tail"]) == (1, 3, ["boom"])
    a.send({"type": "done", "exit_code": 3})
    assert wait_for(lambda: controller.finished() == {0}, 5)
    a.close()
    b.close()


def test_abort_reaches_every_node_and_late_joiners(controller):
    early, early_stop = _client(controller, 0)
    assert wait_for(lambda: controller.connected() == {0}, 5)
    controller.abort(signal.SIGINT, "test abort")
    assert wait_for(lambda: early_stop.requested, 5)
    assert (early_stop.signum, early_stop.from_user, early_stop.force) == (signal.SIGINT, False, False)
    late, late_stop = _client(controller, 1)
    assert wait_for(lambda: late_stop.requested, 5) and late_stop.signum == signal.SIGINT
    controller.abort(signal.SIGKILL, "again", force=True)
    assert wait_for(lambda: early_stop.force and late_stop.force, 5)
    early.close()
    late.close()


def test_lost_runner_stops_the_node():
    ctl = JobController(num_nodes=1, token="t", bind_host="127.0.0.1")
    client, stop = _client(ctl, 0, token="t")
    assert wait_for(lambda: ctl.connected() == {0}, 5)
    ctl.close()  # the runner dies
    assert wait_for(lambda: stop.requested, 5)
    assert stop.signum == signal.SIGTERM and "lost the connection" in stop.reason
    client.close()


def test_node_that_drops_without_done_is_lost(controller):
    client, _ = _client(controller, 1)
    assert wait_for(lambda: controller.connected() == {1}, 5)
    client.sock.shutdown(socket.SHUT_RDWR)  # a crashed node: the connection ends without "done"
    assert wait_for(lambda: controller.lost == {1}, 5)


def test_unreachable_controller_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(RuntimeError, match="cannot reach the deepscale job controller"):
            ControlClient(f"127.0.0.1:{port}", "t", 0, "h", StopRequest(), connect_timeout_s=0.5)


def test_stop_request_second_user_signal_forces():
    stop = StopRequest()
    stop.request(signal.SIGINT, from_user=True)
    assert stop.requested and not stop.force
    stop.request(signal.SIGINT, from_user=True)
    assert stop.force and stop.signum == signal.SIGINT
