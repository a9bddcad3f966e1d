"""When parameter groups are gathered, prefetched, released and their gradients reduced.

Note: the recorded order. Every forward records the sequence of groups it acquires. The next
forward follows the recorded sequence while it matches: after acquiring the group at position
``i`` it issues asynchronous all-gathers for the groups after ``i`` until
``stage3_prefetch_bucket_size`` elements are in flight or ``stage3_max_live_parameters``
elements would be gathered at once. A group whose next use is at most
``stage3_max_reuse_distance`` elements ahead is kept instead of released. When the model takes
another branch the sequence stops matching: prefetching stops for the rest of that forward (the
prefetched groups are released at its end) and the new sequence is recorded, so a change of
order costs only the prefetch. Backward walks the recorded sequence in reverse to prefetch the
groups whose gradients are still to come. Decisions depend only on the recorded sequence and on
element counts, so every rank that runs the same modules issues the same collectives.

Note: the tail of the forward. The backward starts with the groups the forward used last, so a
group whose last forward use is followed by at most ``min(stage3_max_reuse_distance,
stage3_prefetch_bucket_size)`` elements of other groups (the recorded order, reversed) is kept
gathered through the end of the forward instead of released and gathered again at once: the
backward's prefetch would hold those groups at that point anyway, so peak memory does not grow,
and a small model whose groups all sit in that window (a tied embedding used first and last)
saves a whole all-gather per step. Only trainable groups under grad mode are kept; the backward's
end releases them as always, and the step releases any still gathered (a forward without a
backward) when it publishes the new shards, so no stale value outlives a step.

Note: other backwards. A backward the owning engine did not start (a GAN's generator loss
flowing back through this discriminator, or a plain ``loss.backward()``) still gathers the groups
its modules need, but takes no gradient: they stay in ``param.grad``, as in PyTorch, where the
user's ``zero_grad()`` clears them or the engine's next backward adds to them before reducing.
Nothing ends such a backward, so the engine's next forward, backward or step closes it
(``close_stray_backward``): outside a running autograd pass a coordinator still in BACKWARD can
only be left from one.

Note: gradients, in an order every rank shares. When every trainable parameter of a group has
its gradient accumulated in a backward, the group is ready and released. Reduce-scatters are
launched strictly in one order, the same on every rank: the groups by descending first position
in the recorded forward sequence (roughly the order backward completes them; the order is
identical on all ranks because the end-of-forward check compares the sequences), then the
groups the forward did not acquire. A ready group waits until the groups before it were
launched; when the backward ends every group not yet launched is reduced in that order, with
zeros for the gradients it did not get. So a parameter that gets no gradient on some rank only
(a branch inside a module) delays that rank's reduces but never reorders them, which would mix
the gradients of different groups or hang, as PyTorch DDP's in-order bucket launch avoids.
Reduce-scatters run on their own process group (``collectives.twin_group``): on one group their
interleaving with the backward's all-gathers would depend on when each rank's groups became
ready.
"""
from typing import Callable, List, Optional, Sequence

import torch

from deepscale.runtime.zero.stage3.collectives import CollectiveRunner
from deepscale.runtime.zero.stage3.param_group import ParamGroup
from deepscale.runtime.zero.stage3.states import ShardState, TrainingState, training_state_machine
from deepscale.utils.logging import logger

_MAX_PENDING_REDUCES = 2


class ParamCoordinator:
    """Drives the gather/release/reduce of the parameter groups of one model.

    Args:
        groups: all parameter groups (persistent ones are never released).
        prefetch_numel: ``stage3_prefetch_bucket_size`` in elements (0 disables prefetch).
        max_live_numel: ``stage3_max_live_parameters``.
        max_reuse_distance: ``stage3_max_reuse_distance`` in elements.
        comm_dtype: dtype gradients are reduced in.
        on_reduced: called with ``(group, output)`` once a group's reduce-scatter finished.
        runner: the collective runner (for the debug-mode phase checks).
    """

    def __init__(self, groups: Sequence[ParamGroup], prefetch_numel: int, max_live_numel: int,
                 max_reuse_distance: int, comm_dtype: torch.dtype,
                 on_reduced: Callable[[ParamGroup, torch.Tensor], None], runner: CollectiveRunner):
        self.groups = list(groups)
        self.runner = runner
        self.prefetch_numel, self.max_live_numel = int(prefetch_numel), int(max_live_numel)
        self.max_reuse_distance = int(max_reuse_distance)
        self.comm_dtype, self.on_reduced = comm_dtype, on_reduced
        self.training = training_state_machine()
        self.trace: List[int] = []
        self._next_use: List[int] = []
        self._numel_prefix: List[int] = [0]
        self._current: List[int] = []
        self._on_track = False
        self._prefetch_cursor = 0
        self._bwd_cursor = -1
        self.live_numel = self.peak_live_numel = self.inflight_numel = 0
        self.module_stack: List[str] = []
        self.running_hooks: List = []  # the ModuleHooks of the modules whose forward runs
        self.last_module: Optional[str] = None
        self._modules_run = 0
        self._pending: List[tuple] = []
        self.trainable_of = {g.index: [] for g in self.groups}
        self._reduce_order: List[int] = []
        self._launched = 0  # how many groups of _reduce_order this backward has reduced
        self._ready: set = set()
        # parameter offload (runtime/offload/param_offload.py): told where each phase begins
        # and ends, so that it reads shards ahead in the order the last pass used them
        self.offload = None
        self.armed = False  # the owning engine's own backward is running (see the Note on other backwards)

    # --- gather / release -----------------------------------------------------------------
    def fetch(self, group: ParamGroup) -> None:
        """Make ``group`` usable now (waiting for a prefetch or gathering on demand)."""
        if group.is_gathered:
            return
        if group.is_sharded:
            self._start(group)
        self.inflight_numel -= group.numel
        group.finish_gather()

    def _start(self, group: ParamGroup) -> None:
        if not group.persistent:
            self.live_numel += group.numel
            self.peak_live_numel = max(self.peak_live_numel, self.live_numel)
        self.inflight_numel += group.numel
        group.start_gather()

    def release(self, group: ParamGroup, force: bool = False) -> None:
        """Release ``group`` unless persistent or (without ``force``) held for the backward."""
        if group.persistent or group.is_sharded or (group.held_for_backward and not force):
            return
        group.held_for_backward = False
        if group.state == ShardState.GATHERING:
            self.inflight_numel -= group.numel
        group.release()
        self.live_numel -= group.numel

    def release_all(self) -> None:
        """Release every non-persistent group (``engine.empty_partition_cache()``)."""
        for group in self.groups:
            group.users = 0
            self.release(group, force=True)

    # --- forward --------------------------------------------------------------------------
    def close_stray_backward(self) -> None:
        """End a backward that this engine did not finish (another engine's backward through this
        model, or one that raised): release its groups and go back to idle. A no-op inside a
        running backward (a recompute under activation checkpointing) or when idle."""
        if self.training != TrainingState.BACKWARD or torch._C._current_graph_task_id() != -1:
            return
        logger.debug("ZeRO-3: closing a backward the engine did not run (another engine's, or one that raised)")
        self.armed = False
        self._leave_backward()

    def _leave_backward(self) -> None:
        # Recomputation under activation checkpointing may stop before a module's post-forward
        # hook runs, so use counts are not trusted here: after a backward no module is running.
        for group in self.groups:
            group.backward_done = False
            group.reported.clear()
            group.users = 0
            self.release(group, force=True)
        self.module_stack.clear()
        self.running_hooks.clear()
        if self.training == TrainingState.BACKWARD:
            self.training.to(TrainingState.IDLE)

    def begin_forward(self) -> None:
        self.close_stray_backward()
        if self.training == TrainingState.FORWARD:  # the previous forward raised
            logger.debug("ZeRO-3: a forward began before the previous one ended; releasing its groups")
            self.release_all()
            self.module_stack.clear()
            self.running_hooks.clear()
            self.training.to(TrainingState.IDLE)
        if self.training != TrainingState.IDLE:
            return  # forward during backward: activation checkpointing recomputes
        self.training.to(TrainingState.FORWARD)
        self._current, self._on_track, self._prefetch_cursor = [], bool(self.trace), 0
        if self.offload is not None:
            self.offload.begin_phase("forward")
        self._modules_run = 0

    def enter_module(self, name: str, index: int) -> None:
        """A module's forward begins (``index``: its position in the model, the same on every rank)."""
        self.module_stack.append(name)
        self.last_module = name
        if self.training == TrainingState.FORWARD:
            # which modules ran, in order: ranks that took different branches differ here even
            # when their parameters travel in the same groups (or in none)
            self._modules_run = hash((self._modules_run, index))

    def end_forward(self) -> None:
        if self.training != TrainingState.FORWARD:
            return
        # the recorded sequence decides the reduce order: compare it across ranks too
        self.runner.check_boundary("end_forward", self.last_module,
                                   token=hash((tuple(self._current), self._modules_run)))
        on_track = self._on_track and len(self._current) == len(self.trace)
        for group in self.groups:
            if group.users == 0 and not (on_track and self._needed_first_in_backward(group)):
                self.release(group)
        self._set_trace(self._current)
        self.training.to(TrainingState.IDLE)
        if self.offload is not None:
            self.offload.end_phase()
            if torch.is_grad_enabled():
                self.offload.prepare_phase("backward")

    def _set_trace(self, trace: List[int]) -> None:
        self.trace = list(trace)
        self._next_use = [len(trace)] * len(trace)
        last = {}
        for position in range(len(trace) - 1, -1, -1):
            self._next_use[position] = last.get(trace[position], len(trace))
            last[trace[position]] = position
        self._numel_prefix = [0]
        for index in trace:
            self._numel_prefix.append(self._numel_prefix[-1] + self.groups[index].numel)
        self._set_reduce_order(trace)

    def _set_reduce_order(self, trace: List[int]) -> None:
        first = {}
        for position, index in enumerate(trace):
            first.setdefault(index, position)
        trainable = [g.index for g in self.groups if self.trainable_of[g.index]]
        acquired = sorted((i for i in trainable if i in first), key=lambda i: -first[i])
        self._reduce_order = acquired + [i for i in trainable if i not in first]

    def acquire(self, groups: Sequence[ParamGroup]) -> None:
        """Pre-forward: gather ``groups`` for a module and prefetch what the recorded order says comes next."""
        recording = self.training == TrainingState.FORWARD
        for group in groups:
            if recording:
                position = len(self._current)
                self._current.append(group.index)
                group.last_position = position
                if self._on_track and (position >= len(self.trace) or self.trace[position] != group.index):
                    self._on_track = False
            self.fetch(group)
            group.users += 1
        if recording and self._on_track and self.prefetch_numel > 0:
            self._prefetch_forward(len(self._current))

    def _prefetch_forward(self, start: int) -> None:
        position = max(start, self._prefetch_cursor)
        while position < len(self.trace):
            group = self.groups[self.trace[position]]
            if group.is_sharded and not group.persistent:
                if not self._may_prefetch(group):
                    break
                self._start(group)
            position += 1
        self._prefetch_cursor = position

    def _may_prefetch(self, group: ParamGroup) -> bool:
        return (self.inflight_numel + group.numel <= self.prefetch_numel
                and self.live_numel + group.numel <= self.max_live_numel)

    def release_after_forward(self, groups: Sequence[ParamGroup]) -> None:
        """Post-forward: release ``groups`` unless still used (an enclosing module, a near reuse)."""
        for group in groups:
            group.users = max(0, group.users - 1)
            if group.users or group.persistent or self.training == TrainingState.BACKWARD:
                continue
            if (self.training == TrainingState.FORWARD and self.live_numel <= self.max_live_numel
                    and (self._reused_soon(group) or self._needed_first_in_backward(group))):
                continue
            self.release(group)

    def _needed_first_in_backward(self, group: ParamGroup) -> bool:
        """Whether ``group`` is at the tail of the recorded forward, close enough to the start of
        the backward to keep it gathered through the boundary (see the Note on the tail)."""
        if not (self._on_track and torch.is_grad_enabled() and self.trainable_of[group.index]):
            return False
        position = getattr(group, "last_position", None)
        if position is None or position >= len(self.trace):
            return False
        after = self._numel_prefix[len(self.trace)] - self._numel_prefix[position + 1]
        return after + group.numel <= min(self.max_reuse_distance, self.prefetch_numel)

    def _reused_soon(self, group: ParamGroup) -> bool:
        if not self._on_track:
            return False
        position = getattr(group, "last_position", None)
        if position is None or position >= len(self._next_use):
            return False
        following = self._next_use[position]
        if following >= len(self.trace):
            return False
        current = len(self._current)
        distance = self._numel_prefix[following] - self._numel_prefix[min(current, following)]
        return distance <= self.max_reuse_distance

    # --- backward -------------------------------------------------------------------------
    def pre_backward(self, groups: Sequence[ParamGroup]) -> None:
        """A module's backward is about to run: its groups must be gathered."""
        if self.training == TrainingState.IDLE:
            self.training.to(TrainingState.BACKWARD)
            self._bwd_cursor = len(self.trace) - 1
            if self.offload is not None:
                self.offload.begin_phase("backward")
        for group in groups:
            self.fetch(group)
        if self.prefetch_numel > 0 and self.training == TrainingState.BACKWARD:
            self._prefetch_backward()

    def _prefetch_backward(self) -> None:
        while self._bwd_cursor >= 0:
            group = self.groups[self.trace[self._bwd_cursor]]
            if (group.is_sharded and not group.persistent and not group.backward_done
                    and self.trainable_of[group.index]):
                if not self._may_prefetch(group):
                    return
                self._start(group)
            self._bwd_cursor -= 1

    def has_frozen(self, groups: Sequence[ParamGroup]) -> bool:
        """Whether any of ``groups`` has no trainable parameter (no gradient ever releases it)."""
        return any(not self.trainable_of[g.index] for g in groups)

    def post_backward(self, groups: Sequence[ParamGroup]) -> None:
        """A module's backward is done: release its groups that have no trainable parameter.

        Note: frozen groups in backward. A group is released in backward once its gradients
        are in (``grad_ready``); a group of frozen parameters gets none, so without this it
        stayed gathered until the backward ended: a frozen body of any size was held whole.
        Its modules' inputs pass through an identity whose backward runs when the module's
        backward finished (``hooks._PostBackward``, as PyTorch FSDP2 does); a later module
        that reads the group again gathers it again in its pre-backward hook."""
        if self.training != TrainingState.BACKWARD:
            return
        for group in groups:
            if not self.trainable_of[group.index] and group.users == 0:
                self.release(group)

    def grad_ready(self, param: torch.nn.Parameter, group: ParamGroup) -> None:
        """Post-accumulate-grad hook: reduce the group once all its trainable gradients are in."""
        group.reported.add(id(param))
        if len(group.reported) < len(self.trainable_of[group.index]):
            return
        if not self.armed:  # another backward: the gradients stay in param.grad (see the Note)
            group.reported.clear()
            if group.users == 0:
                self.release(group)
            return
        if group.backward_done:  # complete again in this backward (reentrant checkpointing)
            self._reduce(group)
            return
        group.backward_done = True
        if group.users == 0:
            self.release(group)
        self._ready.add(group.index)
        self._launch_ready()

    def _launch_ready(self) -> None:
        order = self._reduce_order
        while self._launched < len(order) and order[self._launched] in self._ready:
            self._reduce(self.groups[order[self._launched]])
            self._launched += 1

    def _reduce(self, group: ParamGroup) -> None:
        group.reported.clear()
        work, output, flat = group.start_reduce(self.comm_dtype, self.trainable_of[group.index])
        self._pending.append((work, group, output, flat))
        # Only reduces that already finished are completed here: another rank may launch its
        # reduces later (a group whose gradients came in only partly waits for the end of its
        # backward), and blocking on one would stop this rank's backward all-gathers, which
        # that rank's backward waits for.
        while len(self._pending) > _MAX_PENDING_REDUCES and self._pending[0][0].is_completed():
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        work, group, output, flat = self._pending.pop(0)
        work.wait()  # the collective watchdog watches this wait
        self.on_reduced(group, output)
        group.finish_reduce(flat)

    def end_backward(self) -> None:
        """Flush groups whose gradients came in only partly, finish every reduce, release."""
        self.runner.check_boundary("end_backward", self.last_module)
        if not self._reduce_order and not self.trace:  # a backward without a recorded forward
            self._set_reduce_order([])
        for index in self._reduce_order[self._launched:]:
            self._reduce(self.groups[index])
        self._launched = 0
        self._ready.clear()
        while self._pending:
            self._complete_oldest()
        self._leave_backward()
        if self.offload is not None:
            self.offload.end_phase()

    @property
    def has_pending_reduces(self) -> bool:
        return bool(self._pending)

    def current_module(self) -> Optional[str]:
        return self.module_stack[-1] if self.module_stack else None
