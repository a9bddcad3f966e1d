"""The base every training optimizer (ZeRO stages 0 to 3) builds on: one step, written once.

Note: what is shared and what is not. Each stage keeps its gradients in its own layout (stage 0
a flat buffer of whole gradients, stages 1-2 this rank's chunk of every bucket, stage 3 one fp32
partition per param group), but the step is the same everywhere:

1. refuse a step with nothing to apply (no ``engine.backward`` since the last step);
2. put this rank's reduced gradients on the fp32 masters (the stage's ``_attach_step_grads``);
3. one global L2 norm over them (:meth:`TrainingOptimizer.global_grad_norm`: one all-reduce of
   squared local norms when gradients are partitioned, a plain norm when every rank holds them
   whole), which gives the overflow test, the clipping coefficient and ``get_global_grad_norm``;
4. :class:`PrecisionOptimizer` unscales, clips with the *unscaled* norm, skips the step when the
   norm is not finite (at every precision, with a warning; fp16 also backs off its loss scale)
   and runs the torch optimizer;
5. on an applied step the stage publishes the masters into the model (``_publish_masters``).

The norm is global, so every rank takes the same skip decision without another collective.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from deepscale import comm as dist
from deepscale.runtime.precision.precision_optimizer import squared_norm
from deepscale.utils.logging import logger


@dataclass
class TensorParallelNorm:
    """What the global norm needs under tensor parallelism: the group, its size and the
    parameters every tensor-parallel rank holds whole (their gradients must count once)."""

    group: object
    size: int
    replicated: List[torch.nn.Parameter]


class TrainingOptimizer:
    """Shared step logic and read-only faces of the stage optimizers.

    Subclasses set ``self.precision`` (a :class:`PrecisionOptimizer`, or None without an
    optimizer), ``self.group`` and ``self.world_size``, call :meth:`_note_backward` at the end
    of every ``finish_backward``, and implement ``_attach_step_grads`` (returns the gradient
    tensors the norm runs over) and ``_publish_masters``.
    """

    #: True when each rank holds only part of the gradients (stages 1-3): the norm needs an all-reduce.
    grads_partitioned = True
    precision = None
    #: set by the engine under tensor parallelism (a :class:`TensorParallelNorm`)
    tensor_parallel: Optional[TensorParallelNorm] = None
    _backward_since_step = False
    #: Optional ``f(squares) -> squares`` applied to the data-parallel sum of squared gradient norms:
    #: the pipeline engine adds the other stages' share (and drops tied duplicates) here.
    reduce_norm_squares = None

    # --- subclass parts -------------------------------------------------------------------
    def _attach_step_grads(self) -> List[torch.Tensor]:
        raise NotImplementedError

    def _local_grad_parts(self, params) -> List[torch.Tensor]:
        """This rank's part of the reduced gradients of ``params`` (for the tensor-parallel norm)."""
        raise NotImplementedError(f"{type(self).__name__} does not support tensor parallelism")

    def _publish_masters(self) -> None:
        """After an applied step: bring the updated masters into the model (no-op by default)."""

    def _note_backward(self) -> None:
        """Record that a backward of this engine put gradients in its buffers."""
        self._backward_since_step = True

    # --- the step -------------------------------------------------------------------------
    def global_grad_norm(self, grads: List[torch.Tensor]) -> torch.Tensor:
        """Global L2 norm of the gradients (still loss-scaled) as a 0-dim fp32 tensor."""
        squares = squared_norm(grads)
        tp = self.tensor_parallel
        if tp is not None and tp.size > 1:
            # Sharded gradients differ across tensor-parallel ranks, replicated ones are equal:
            # each rank adds its shards and 1/tp of the replicated squares, then the group sums.
            parts = self._local_grad_parts(tp.replicated)
            if parts:
                squares = squares - squared_norm(parts) * ((tp.size - 1) / tp.size)
            dist.all_reduce(squares, group=tp.group)
        if self.grads_partitioned and self.world_size > 1:
            dist.all_reduce(squares, group=self.group)
        if self.reduce_norm_squares is not None:
            squares = self.reduce_norm_squares(squares)
        return squares.sqrt().float()

    def step(self) -> bool:
        """Unscale, clip, check and apply the accumulated gradients. Returns True if applied."""
        if self.precision is None:
            raise RuntimeError("engine.step(): no optimizer was configured; pass optimizer= to initialize() or "
                               "add an 'optimizer' section to the config")
        if not self._backward_since_step:
            logger.warning("engine.step() was called with no engine.backward() since the last step: there are no "
                           "gradients to apply, so this step is skipped (weights, optimizer state and lr schedule "
                           "unchanged). Call engine.backward(loss) before engine.step()")
            return False
        grads = self._attach_step_grads()
        applied = self.precision.step(grad_norm=self.global_grad_norm(grads))
        if applied:
            self._publish_masters()
        self.precision.zero_grad()
        self._backward_since_step = False
        return applied

    # --- what the engine and users read ---------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.precision.loss_scale if self.precision is not None else 1.0

    cur_scale = loss_scale

    @property
    def overflow(self) -> bool:
        """True when the last step was skipped for a non-finite gradient."""
        return self.precision.last_overflow if self.precision is not None else False

    @property
    def last_grad_norm(self):
        """Global gradient norm (unscaled, before clipping) of the last step; None after a skip."""
        return self.precision.last_grad_norm if self.precision is not None else None

    @property
    def basic_optimizer(self):
        """The torch optimizer that updates the fp32 masters (None without an optimizer)."""
        return self.precision.optimizer if self.precision is not None else None

    @property
    def param_groups(self):
        basic = self.basic_optimizer
        return basic.param_groups if basic is not None else []

    @property
    def state(self):
        return self.basic_optimizer.state

    @property
    def defaults(self):
        return self.basic_optimizer.defaults
