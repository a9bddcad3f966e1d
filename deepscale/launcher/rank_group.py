"""Runs a node's ranks to completion: the first failure stops the others, signals are forwarded."""
import signal
import time
from typing import Callable, Dict, List, Optional

from deepscale.launcher.constants import POLL_INTERVAL_S
from deepscale.launcher.signals import StopRequest
from deepscale.launcher.spawner import Failure, RankProcess, RankSpec, exit_code_of


class RankGroup:
    """The started ranks of one node.

    Args:
        specs: the ranks to start.
        base_env: the environment the ranks inherit (their ``spec.env`` goes on top).
        grace_s: seconds between the stop signal and SIGKILL.
        append_logs: append to existing log files (restarts) instead of truncating.
    """

    def __init__(self, specs: List[RankSpec], base_env: Dict[str, str], grace_s: float, append_logs: bool = False):
        self.specs = specs
        self.base_env = base_env
        self.grace_s = grace_s
        self.append_logs = append_logs
        self.procs: List[RankProcess] = []
        self._reported = set()

    def start(self) -> None:
        """Start every rank; if one cannot start, the started ones are killed and the error re-raised."""
        try:
            for spec in self.specs:
                self.procs.append(RankProcess(spec, self.base_env, self.append_logs))
        except OSError as err:
            self.kill()
            raise RuntimeError(f"cannot start rank {spec.rank} ({spec.cmd[0]}): {err}") from err

    def pids(self) -> Dict[int, int]:
        """``global rank -> pid`` of the started ranks."""
        return {proc.spec.rank: proc.popen.pid for proc in self.procs}

    def newly_exited(self) -> List[RankProcess]:
        """Ranks that exited since the last call."""
        exited = []
        for proc in self.procs:
            if proc.spec.rank not in self._reported and proc.poll() is not None:
                self._reported.add(proc.spec.rank)
                exited.append(proc)
        return sorted(exited, key=lambda p: p.exit_time)

    def alive(self) -> bool:
        """True while any rank runs."""
        return any(proc.poll() is None for proc in self.procs)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every running rank's process group."""
        for proc in self.procs:
            proc.signal(signum)

    def kill(self) -> None:
        """SIGKILL every rank's process tree and reap it."""
        self.signal(signal.SIGKILL)
        for proc in self.procs:
            proc.popen.wait()

    def close(self) -> None:
        """Close the ranks' log files."""
        for proc in self.procs:
            proc.close()

    def run(self, stop: StopRequest, on_failure: Optional[Callable[[Failure], None]] = None,
            node_rank: int = 0, host: str = "localhost") -> "GroupOutcome":
        """Watch the ranks until all exited.

        The first rank to exit non-zero stops the others with SIGTERM (SIGKILL after the grace
        period). A request in ``stop`` forwards its signal; a forced request kills at once.

        Args:
            stop: polled for external stop requests (signals, controller aborts).
            on_failure: called once with the first failure, as soon as it is seen.
        """
        failure, stopping_since, kill_sent = None, None, False
        while True:
            for proc in self.newly_exited():
                code = exit_code_of(proc.popen.returncode)
                if code != 0 and failure is None:
                    failure = Failure(proc.spec.rank, code, proc.tail(), primary=not stop.requested,
                                      node_rank=node_rank, host=host, exit_time=proc.exit_time)
                    if on_failure is not None:
                        on_failure(failure)
                    if failure.primary:
                        stop.request(signal.SIGTERM, reason=failure.describe())
            if not self.alive():
                break
            if stop.requested and stopping_since is None:
                self.signal(stop.signum)
                stopping_since = time.monotonic()
            overdue = stopping_since is not None and time.monotonic() - stopping_since > self.grace_s
            if (stop.force or overdue) and not kill_sent:
                self.signal(signal.SIGKILL)
                kill_sent = True
            time.sleep(POLL_INTERVAL_S)
        for proc in self.procs:
            proc.popen.wait()
        return GroupOutcome(failure, stop)


class GroupOutcome:
    """How a node's ranks ended: ``failure`` (or None) and the stop request, if any."""

    def __init__(self, failure: Optional[Failure], stop: StopRequest):
        self.failure = failure
        self.stop_signal = stop.signum if stop.from_user or (stop.requested and failure is None) else None

    @property
    def exit_code(self) -> int:
        """The failing rank's code; else ``128 + signal`` when stopped from outside; else 0."""
        if self.failure is not None and self.failure.primary:
            return self.failure.exit_code
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        return self.failure.exit_code if self.failure is not None else 0
