"""Data-parallel gradient averaging in buckets, overlapped with backward.

Note: how gradients flow. Each trainable parameter owns a slice of one flat buffer in the
accumulation dtype (fp32 unless configured). When the parameter has that dtype (an fp32 model),
``param.grad`` *is* its slice (a "bucket view", as DDP's ``gradient_as_bucket_view``): autograd
accumulates micro-batches into the buffer in place and nothing is copied. Otherwise (a bf16 or
fp16 model) a post-accumulate-grad hook adds the fresh gradient into the slice and frees
``param.grad``, so micro-batches accumulate in full precision. The flat buffer is cut into
buckets of about ``bucket_numel`` elements in reverse parameter order (roughly the order
backward produces them). On the last micro-batch of an accumulation window, a bucket whose
parameters have all reported is all-reduced asynchronously while backward goes on. Buckets are
launched strictly in index order on every rank: ranks that see different unused parameters
would otherwise issue collectives in different orders and mismatch. ``end_backward(sync=True)``
launches whatever is left (buckets holding parameters that got no gradient), waits for all and
divides by the data-parallel size. This is the bucketing scheme of PyTorch DDP (Li et al.
2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training").

Note: whose backward it is. The hooks act only between :meth:`GradientReducer.begin_backward`
and :meth:`GradientReducer.end_backward`, i.e. during the engine's own backward. A backward the
user runs otherwise (a GAN's generator loss flowing through the discriminator) leaves its
gradients where PyTorch puts them, in ``param.grad``, where they accumulate and where the
module's ``zero_grad()`` clears them. ``begin_backward`` then takes ``param.grad`` as the
gradient accumulated so far, exactly as autograd would add the new gradient to it: a bucket
view that the user set to None (``zero_grad()``) restarts from zero, a foreign tensor is folded
into the buffer.
"""
from typing import Dict, List, Optional, Sequence

import torch

from deepscale import comm as dist


class _Bucket:
    __slots__ = ("index", "start", "end", "params", "num_ready", "handle", "comm_tensor")

    def __init__(self, index: int, start: int, end: int, params: List[torch.nn.Parameter]):
        self.index, self.start, self.end, self.params = index, start, end, params
        self.num_ready = 0
        self.handle = None
        self.comm_tensor = None


class GradientReducer:
    """Owns the flat gradient buffer of a set of parameters and averages it across ranks.

    Args:
        params: trainable parameters, in registration order.
        group: data-parallel process group (``None``: the default group).
        world_size: size of ``group``.
        bucket_numel: elements per all-reduce bucket. Default 25M (about 100 MB of fp32).
        accum_dtype: dtype of the flat gradient buffer. Default float32.
        comm_dtype: dtype on the wire; default ``accum_dtype``.
        predivide_factor: divide by this before the all-reduce and by ``world_size /
            predivide_factor`` after (guards fp16 sums against overflow). Default 1.0.
        average_world_size: the sum is divided by this many ranks instead of ``world_size``
            (expert gradients: reduced over the expert-data-parallel group, averaged over the
            data-parallel group; see ``runtime/expert_grads.py``). Default ``world_size``.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], group=None, world_size: int = 1,
                 bucket_numel: int = 25_000_000, accum_dtype: torch.dtype = torch.float32,
                 comm_dtype: Optional[torch.dtype] = None, predivide_factor: float = 1.0,
                 average_world_size: Optional[int] = None):
        if bucket_numel < 1:
            raise ValueError(f"reduce_bucket_size must be a positive number of elements, got {bucket_numel}")
        self.params = [p for p in params if p.requires_grad]
        self.group, self.world_size = group, world_size
        self.average_world_size = average_world_size or world_size
        self.comm_dtype = comm_dtype or accum_dtype
        self.predivide_factor = float(predivide_factor)
        device = self.params[0].device if self.params else torch.device("cpu")
        total = sum(p.numel() for p in self.params)
        self.buffer = torch.zeros(total, dtype=accum_dtype, device=device)
        self._views: Dict[torch.nn.Parameter, torch.Tensor] = {}
        self._bucket_of: Dict[torch.nn.Parameter, _Bucket] = {}
        self.buckets = self._build_buckets(bucket_numel)
        # Parameters whose .grad is their slice of the buffer (same dtype): autograd accumulates in place.
        self._as_view = {p for p in self.params if p.dtype == accum_dtype}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]
        self.sync_enabled = True  # this backward ends an accumulation window
        self._armed = False  # True only during the owner's own backward
        self._next_to_launch = 0
        self._pending = False  # a backward has written into the buffer since the last finalize
        self._synced = False  # the buffer holds averaged gradients not yet stepped on
        self.foreign_after_sync = False  # another backward touched the parameters after the average

    # --- layout ---------------------------------------------------------------------------
    def _build_buckets(self, bucket_numel: int) -> List[_Bucket]:
        buckets, current, start, offset = [], [], 0, 0
        for param in reversed(self.params):
            n = param.numel()
            self._views[param] = self.buffer[offset:offset + n].view(param.shape)
            current.append(param)
            offset += n
            if offset - start >= bucket_numel:
                buckets.append(_Bucket(len(buckets), start, offset, current))
                current, start = [], offset
        if current:
            buckets.append(_Bucket(len(buckets), start, offset, current))
        for bucket in buckets:
            for param in bucket.params:
                self._bucket_of[param] = bucket
        return buckets

    def grad_view(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The slice of the flat buffer holding ``param``'s gradient (shaped like it)."""
        return self._views[param]

    # --- backward -------------------------------------------------------------------------
    @torch.no_grad()
    def begin_backward(self, sync: bool) -> None:
        """Arm the hooks for the owner's backward; take ``param.grad`` as the gradient so far.

        Args:
            sync: this backward ends the accumulation window (all-reduce during it).
        """
        self.sync_enabled = sync
        for param in self.params:
            grad, view = param.grad, self._views[param]
            if param in self._as_view:
                if grad is view:
                    continue
                if grad is None:
                    view.zero_()  # the user cleared it (module.zero_grad())
                else:
                    view.copy_(grad)
                    self._pending = True
                param.grad = view
            elif grad is not None:
                view.add_(grad)  # produced by another backward: accumulate it as autograd would
                param.grad = None
                self._pending = True
        self._armed = True

    def abort_backward(self) -> None:
        """The owner's backward raised: disarm the hooks, so later backwards' gradients stay in
        ``param.grad`` (the engine is not usable for this step; its collectives did not finish)."""
        self._armed = False

    def end_backward(self, sync: bool) -> None:
        """Disarm the hooks; on ``sync`` finish the all-reduce of every bucket and average."""
        self._armed = False
        if sync:
            self.finalize()
        else:
            self.end_micro_step()

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self._armed:
            self.foreign_after_sync = self.foreign_after_sync or self._synced
            return
        grad = param.grad
        if grad is None:
            return
        view = self._views[param]
        if param in self._as_view:
            if grad is not view:  # e.g. create_graph=True accumulates out of place
                view.copy_(grad)
                param.grad = view
        else:
            view.add_(grad)
            param.grad = None
        self._pending = True
        bucket = self._bucket_of[param]
        bucket.num_ready += 1
        if self.sync_enabled and self.world_size > 1:
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_to_launch < len(self.buckets):
            bucket = self.buckets[self._next_to_launch]
            if bucket.num_ready < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        flat = self.buffer[bucket.start:bucket.end]
        if self.predivide_factor != 1.0:
            flat.div_(self.predivide_factor)
        tensor = flat if self.comm_dtype == flat.dtype else flat.to(self.comm_dtype)
        bucket.comm_tensor = tensor
        bucket.handle = dist.all_reduce(tensor, group=self.group, async_op=True)
        self._next_to_launch = bucket.index + 1

    def finalize(self) -> None:
        """Finish the all-reduce of every bucket and average (``end_backward(sync=True)`` calls it)."""
        if self.world_size > 1:
            for bucket in self.buckets[self._next_to_launch:]:
                self._launch(bucket)
            post_scale = self.predivide_factor / self.average_world_size
            for bucket in self.buckets:
                bucket.handle.wait()
                flat = self.buffer[bucket.start:bucket.end]
                if bucket.comm_tensor is not flat:
                    flat.copy_(bucket.comm_tensor)
                flat.mul_(post_scale)
                bucket.handle = bucket.comm_tensor = None
        elif self.average_world_size != 1:
            self.buffer.div_(self.average_world_size)
        self._reset_counters()
        self._pending = False
        self._synced = True

    def end_micro_step(self) -> None:
        """Forget per-backward readiness after a non-boundary backward (no communication)."""
        self._reset_counters()

    def _reset_counters(self) -> None:
        for bucket in self.buckets:
            bucket.num_ready = 0
        self._next_to_launch = 0

    @property
    def has_pending_grads(self) -> bool:
        return self._pending

    def zero(self) -> None:
        """Clear the accumulated gradients (bucket views stay attached as ``param.grad``)."""
        self.buffer.zero_()
        for param in self._as_view:
            param.grad = self._views[param]
        self._reset_counters()
        self._pending = self._synced = self.foreign_after_sync = False

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
