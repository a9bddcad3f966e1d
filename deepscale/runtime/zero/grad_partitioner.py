"""Gradient side of ZeRO stages 1 and 2: bucketed reduce-scatter into each rank's chunk.

Note: gradient flow. A post-accumulate-grad hook adds each fresh gradient into its bucket's
staging buffer (accumulation dtype) and frees ``param.grad``. When every parameter of a bucket
has reported, the bucket is reduce-scattered so that each rank receives the sum of its own
chunk (see ``partition.py``). Buckets are launched strictly in index order on every rank, so
ranks that see different unused parameters still issue the same sequence of collectives.

* Stage 1 keeps one persistent staging buffer for all buckets (the full gradient, as stage 0
  does); micro-batches accumulate in it locally and only the boundary backward communicates.
  The reduced chunk is written back into the rank's own slice of the staging buffer.
* Stage 2 never holds the full gradient: a bucket's staging buffer exists only from its first
  gradient until its reduce-scatter completes (at most ``max_inflight`` in flight), every
  backward communicates, and the reduced chunk is accumulated into a persistent partition
  buffer of ``1/world_size`` of the gradients. This is ZeRO-2's P_os+g
  (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", section 5.2).

The hooks act only during the owner's own backward (between :meth:`PartitionedGradients.begin_backward`
and :meth:`PartitionedGradients.finish_backward`); gradients of any other backward stay in
``param.grad`` as PyTorch leaves them (the module's ``zero_grad()`` clears them) and are folded
into the staging buffers at the owner's next backward, as autograd would accumulate them. See
the Note "whose backward it is" in ``runtime/grad_reducer.py``.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from deepscale.runtime.zero.collectives import REDUCE_METHODS, reduce_scatter_flat
from deepscale.runtime.zero.partition import BucketPlan


class ZeroBucket:
    """Run-time state of one bucket: its parameters, staging buffer and the rank's chunk.

    ``comm`` is ``(group, world_size, rank)`` of the ranks sharing the bucket: the data-parallel
    group, or for expert parameters their expert-data-parallel group (``runtime/expert_grads.py``).
    """

    def __init__(self, plan: BucketPlan, params: List[torch.nn.Parameter], comm: Tuple = (None, 1, 0)):
        self.plan = plan
        self.params = params
        self.group, self.world_size, self.rank = comm
        self.staging: Optional[torch.Tensor] = None
        self.own_grad: Optional[torch.Tensor] = None  # this rank's reduced chunk
        self.seen = [False] * len(params)
        self.num_ready = 0
        self.launched = False
        self.handles: List = []
        self.result: Optional[torch.Tensor] = None

    @property
    def index(self) -> int:
        return self.plan.index

    def reset(self) -> None:
        self.seen = [False] * len(self.params)
        self.num_ready = 0
        self.launched = False


class PartitionedGradients:
    """Owns the gradient buffers of ZeRO stage 1 or 2 and reduces them across ranks.

    Args:
        buckets: the buckets, in launch order.
        stage: 1 or 2 (see the module Note).
        rank, world_size, group: this rank in the data-parallel group.
        accum_dtype: dtype gradients accumulate in. Default float32.
        comm_dtype: dtype on the wire. Default ``accum_dtype``.
        overlap_comm: launch reductions from the backward hooks (asynchronous) instead of
            after backward. Default True.
        reduce_method: how a bucket is reduced to its chunks, one of ``collectives.REDUCE_METHODS``
            (see ``collectives.pick_methods``). Default ``"reduce_scatter"``.
        predivide_factor: divide before the reduction by this, after it by
            ``world_size / predivide_factor``. Default 1.0.
        param_names: names used in error messages.
        max_inflight: stage 2 only, reduce-scatters allowed in flight at once. Default 2.
        on_reduced: called with each bucket once its reduced chunk is in ``own_grad``, in bucket
            order (ZeRO-Offload streams it to the host). Default None.
    """

    def __init__(self, buckets: Sequence[ZeroBucket], stage: int, rank: int, world_size: int, group=None,
                 accum_dtype: torch.dtype = torch.float32, comm_dtype: Optional[torch.dtype] = None,
                 overlap_comm: bool = True, reduce_method: str = "reduce_scatter", predivide_factor: float = 1.0,
                 param_names: Optional[Dict[torch.nn.Parameter, str]] = None, max_inflight: int = 2,
                 on_reduced: Optional[Callable[[ZeroBucket], None]] = None):
        if stage not in (1, 2):
            raise ValueError(f"PartitionedGradients: stage must be 1 or 2, got {stage}")
        if reduce_method not in REDUCE_METHODS:
            raise ValueError(f"reduce_method must be one of {REDUCE_METHODS}, got {reduce_method!r}")
        self.buckets = list(buckets)
        self.stage, self.rank, self.world_size, self.group = stage, rank, world_size, group
        self.accum_dtype = accum_dtype
        self.comm_dtype = comm_dtype or accum_dtype
        self.overlap_comm, self.reduce_method = overlap_comm, reduce_method
        self.predivide_factor = float(predivide_factor)
        self.max_inflight = max(1, int(max_inflight))
        self._on_reduced = on_reduced
        self._names = param_names or {}
        self._slot: Dict[torch.nn.Parameter, Tuple[ZeroBucket, int]] = {}
        for bucket in self.buckets:
            for position, param in enumerate(bucket.params):
                self._slot[param] = (bucket, position)
        self.storage = self._allocate_storage()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._slot]
        self.reducing = True  # stage 1: the engine sets False outside the accumulation boundary
        self._armed = False  # True only during the owner's own backward
        self._reduced = False  # stage 1: staging holds a reduced window (other ranks' chunks are stale)
        self._next_to_launch = 0
        self._inflight: List[ZeroBucket] = []
        self._pending = False

    def _allocate_storage(self) -> torch.Tensor:
        device = self.buckets[0].params[0].device if self.buckets else torch.device("cpu")
        per_bucket = [b.plan.padded if self.stage == 1 else b.plan.chunk for b in self.buckets]
        storage = torch.zeros(sum(per_bucket), dtype=self.accum_dtype, device=device)
        offset = 0
        for bucket, size in zip(self.buckets, per_bucket):
            region = storage[offset:offset + size]
            if self.stage == 1:
                bucket.staging = region
                chunk = bucket.plan.chunk
                bucket.own_grad = region[bucket.rank * chunk:(bucket.rank + 1) * chunk]
            else:
                bucket.own_grad = region
            offset += size
        return storage

    # --- backward -------------------------------------------------------------------------
    @torch.no_grad()
    def begin_backward(self, reducing: bool) -> None:
        """Arm the hooks for the owner's backward and fold in gradients other backwards left.

        Args:
            reducing: reduce buckets during this backward (stage 1: the accumulation boundary;
                stage 2: always).
        """
        self.reducing = reducing
        if self._reduced:
            self._drop_reduced_peers()
        for param in self._slot:
            if param.grad is not None:
                self._accumulate(param, param.grad)
        self._armed = True

    @torch.no_grad()
    def _drop_reduced_peers(self) -> None:
        # Stage 1, another backward after a reduction without a step in between (e.g. two
        # backward calls at the boundary): the other ranks' chunks of the staging buffer were
        # already sent and summed; only this rank's averaged chunk carries on, as a sum again so
        # the next reduction's division by the world size leaves it unchanged.
        for bucket in self.buckets:
            chunk = bucket.plan.chunk
            bucket.staging[:bucket.rank * chunk].zero_()
            bucket.staging[(bucket.rank + 1) * chunk:].zero_()
            bucket.own_grad.mul_(self.world_size)
        self._reduced = False

    def _accumulate(self, param: torch.nn.Parameter, grad: torch.Tensor) -> ZeroBucket:
        bucket, position = self._slot[param]
        if bucket.launched:
            raise RuntimeError(f"the gradient of {self._names.get(param, 'a parameter')} arrived after its bucket "
                               "was reduced; call backward once per micro-step (combine losses before backward)")
        if bucket.staging is None:
            bucket.staging = torch.zeros(bucket.plan.padded, dtype=self.accum_dtype, device=grad.device)
        offset, numel = bucket.plan.offsets[position], bucket.plan.numels[position]
        bucket.staging[offset:offset + numel].add_(grad.reshape(-1))
        param.grad = None
        self._pending = True
        return bucket

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        grad = param.grad
        if grad is None or not self._armed:
            return
        bucket = self._accumulate(param, grad)
        position = self._slot[param][1]
        if not bucket.seen[position]:
            bucket.seen[position] = True
            bucket.num_ready += 1
        if self.reducing and (self.overlap_comm or self.stage == 2):
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_to_launch < len(self.buckets):
            bucket = self.buckets[self._next_to_launch]
            if bucket.num_ready < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: ZeroBucket) -> None:
        if bucket.staging is None:  # stage 2: no parameter of this bucket got a gradient
            bucket.staging = torch.zeros(bucket.plan.padded, dtype=self.accum_dtype, device=self.storage.device)
        staging, chunk = bucket.staging, bucket.plan.chunk
        if self.predivide_factor != 1.0:
            staging.div_(self.predivide_factor)
        bucket.launched = True
        self._next_to_launch = bucket.index + 1
        if bucket.world_size == 1:
            bucket.result, bucket.handles = staging[:chunk], []
        else:
            tensor = staging if self.comm_dtype == staging.dtype else staging.to(self.comm_dtype)
            bucket.handles, bucket.result = reduce_scatter_flat(tensor, bucket.rank, bucket.world_size,
                                                                bucket.group, self.reduce_method)
        self._inflight.append(bucket)
        limit = self.max_inflight if self.overlap_comm else 0
        if self.stage == 2:
            while len(self._inflight) > limit:
                self._complete(self._inflight.pop(0))

    def _complete(self, bucket: ZeroBucket) -> None:
        for handle in bucket.handles:
            handle.wait()
        scale = self.predivide_factor / self.world_size
        if self.stage == 1:
            if bucket.result.data_ptr() != bucket.own_grad.data_ptr():
                bucket.own_grad.copy_(bucket.result)
            if scale != 1.0:
                bucket.own_grad.mul_(scale)
        else:
            bucket.own_grad.add_(bucket.result, alpha=scale)
            bucket.staging = None  # stage 2 never keeps a full bucket past its reduction
        bucket.handles, bucket.result = [], None
        if self._on_reduced is not None:
            self._on_reduced(bucket)

    def abort_backward(self) -> None:
        """The owner's backward raised: disarm the hooks (later backwards' gradients stay in ``param.grad``)."""
        self._armed = False

    def finish_backward(self, sync: bool) -> List[torch.nn.Parameter]:
        """Complete this backward's reductions; returns the parameters that got no gradient.

        Stage 1 communicates only when ``sync`` (the accumulation boundary); stage 2 always.
        """
        self._armed = False
        missing = [p for b in self.buckets for p, seen in zip(b.params, b.seen) if not seen]
        if self.stage == 1 and not sync:
            self._reset_counters()
            return missing
        for bucket in self.buckets[self._next_to_launch:]:
            self._launch(bucket)
        while self._inflight:
            self._complete(self._inflight.pop(0))
        self._reset_counters()
        self._reduced = self.stage == 1
        return missing

    def _reset_counters(self) -> None:
        for bucket in self.buckets:
            bucket.reset()
        self._next_to_launch = 0

    # --- what the optimizer reads ---------------------------------------------------------
    def own_grads(self) -> List[torch.Tensor]:
        """This rank's reduced gradient chunk of every bucket (accumulation dtype)."""
        return [bucket.own_grad for bucket in self.buckets]

    def location(self, param: torch.nn.Parameter) -> Tuple[ZeroBucket, int]:
        """``(bucket, position)`` of a managed parameter."""
        return self._slot[param]

    @property
    def has_pending_grads(self) -> bool:
        return self._pending

    def zero(self) -> None:
        """Clear the accumulated gradients."""
        self.storage.zero_()
        self._reset_counters()
        self._pending = self._reduced = False

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
