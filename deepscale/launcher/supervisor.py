"""Watches a multi-node job from the runner: transports, node reports, stops and the final verdict."""
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional

from deepscale.launcher.constants import POLL_INTERVAL_S
from deepscale.launcher.control import JobController
from deepscale.launcher.multinode_runner import Transport
from deepscale.launcher.output import format_tail
from deepscale.launcher.signals import StopRequest

# A transport that exited is given this long for its nodes' last reports to arrive.
_REPORT_DELAY_S = 2.0
# After an abort, how long the nodes get (beyond their own grace period) before the transports are killed.
_ABORT_SLACK_S = 5.0


@dataclass
class JobResult:
    """The job's exit code and, for a failure, a message naming the cause."""
    exit_code: int
    message: str = ""


class RunningTransport:
    """A started transport process and when it exited."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.popen = subprocess.Popen(transport.argv, env=dict(os.environ, **transport.env),
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.exited_at: Optional[float] = None

    def poll(self) -> Optional[int]:
        """The exit code, or None while running; records when it exited."""
        code = self.popen.poll()
        if code is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return code

    def kill(self, signum: int) -> None:
        """Send ``signum`` to the transport's process group."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signum)
            except ProcessLookupError:
                pass


class Supervisor:
    """Runs the loop that ends a multi-node job.

    Args:
        controller: the job controller the nodes report to.
        transports: the started transports.
        stop: stop requests from signals sent to the runner.
        grace_s: the nodes' grace period between the stop signal and SIGKILL.
    """

    def __init__(self, controller: JobController, transports: List[RunningTransport], stop: StopRequest,
                 grace_s: float):
        self.controller = controller
        self.transports = transports
        self.stop = stop
        self.grace_s = grace_s
        self.transport_failure: Optional[str] = None
        self.transport_code = 0
        self._aborted_at: Optional[float] = None
        self._nodes_done_at: Optional[float] = None
        self._forced = False

    def _abort(self, signum: int, reason: str, force: bool = False) -> None:
        self.controller.abort(signum, reason, force=force)
        if self._aborted_at is None:
            self._aborted_at = time.monotonic()

    def _check_transports(self, final: bool = False) -> None:
        finished = self.controller.finished()
        for running in self.transports:
            code = running.poll()
            if code is None or self.transport_failure:
                continue
            if not final and time.monotonic() - running.exited_at < _REPORT_DELAY_S:
                continue
            missing = [n for n in running.transport.node_ranks if n not in finished]
            if missing:
                self.transport_failure = (f"{running.transport.label} exited with code {code} before the launcher "
                                          f"of node(s) {', '.join(map(str, missing))} finished")
                self.transport_code = code or 1

    def _step(self) -> bool:
        """One round of checks; True when the job is over."""
        controller = self.controller
        self._check_transports()
        if not controller.aborted:
            if controller.failures or controller.errors or controller.lost or self.transport_failure:
                self._abort(signal.SIGTERM, "another node failed")
            elif self.stop.requested:
                self._abort(self.stop.signum, self.stop.reason)
        if self.stop.force and not self._forced:
            self._abort(signal.SIGKILL, self.stop.reason, force=True)
            self._forced = True
        transports_done = all(t.poll() is not None for t in self.transports)
        nodes_done = len(controller.finished()) >= controller.num_nodes
        if transports_done or (nodes_done and self._nodes_done_for(_REPORT_DELAY_S)):
            return True
        if self._aborted_at is not None:
            waited = time.monotonic() - self._aborted_at
            if waited > self.grace_s + _ABORT_SLACK_S or (self._forced and waited > _ABORT_SLACK_S):
                return True
        return False

    def _nodes_done_for(self, delay_s: float) -> bool:
        # All nodes reported; the transports get a moment to exit on their own.
        if self._nodes_done_at is None:
            self._nodes_done_at = time.monotonic()
        return time.monotonic() - self._nodes_done_at > delay_s

    def run(self) -> JobResult:
        """Loop until the job is over, stop leftover transports, and return the verdict."""
        while not self._step():
            time.sleep(POLL_INTERVAL_S)
        # A node's last reports precede its disconnect; wait for those to be read before judging.
        deadline = time.monotonic() + _REPORT_DELAY_S
        while self.controller.connected() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        for running in self.transports:
            running.kill(signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for running in self.transports:
            try:
                running.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                running.kill(signal.SIGKILL)
                running.popen.wait()
        return self.verdict()

    def verdict(self) -> JobResult:
        """Exit code and message: a rank's failure first, then a user's signal, then node or transport errors."""
        controller = self.controller
        self._check_transports(final=True)
        failure = controller.first_failure()
        if failure is not None and failure.get("primary"):
            return JobResult(int(failure["exit_code"]), _failure_text(failure))
        if self.stop.from_user:
            return JobResult(128 + self.stop.signum, f"stopped by {self.stop.reason}")
        if controller.errors:
            return JobResult(1, "; ".join(controller.errors))
        if self.transport_failure:
            return JobResult(self.transport_code, self.transport_failure)
        if failure is not None:
            return JobResult(int(failure["exit_code"]), _failure_text(failure))
        missing = sorted(set(range(controller.num_nodes)) - set(controller.done))
        if missing:
            return JobResult(1, f"the launcher of node(s) {', '.join(map(str, missing))} ended without reporting")
        return JobResult(max(controller.done.values(), default=0))


def _failure_text(failure: dict) -> str:
    return (f"rank {failure['rank']} (node {failure['node_rank']}, {failure['host']}) exited with code "
            f"{failure['exit_code']}; its last output lines:\n{format_tail(failure.get('tail'))}")
