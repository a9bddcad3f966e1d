"""ZeRO stages 1 and 2: the training optimizer with partitioned optimizer states (and gradients).

Note: what lives where. Model parameters stay whole on every rank, but each trainable one
becomes a view into a flat per-bucket buffer in the model dtype (see ``partition.py``). Rank
``r`` owns chunk ``r`` of every bucket: the torch optimizer sees one fp32 master tensor per
bucket, holding only that chunk, so its states (Adam's moments) are ``1/N`` of the model too.
With an fp32 model the master chunk *is* the rank's chunk of the model buffer (no copy); with
fp16/bf16 it is a separate fp32 tensor. After an applied step every bucket is all-gathered in
place, which refreshes the other ranks' chunks of the model buffer. Gradients are reduced into
the rank's chunk by :class:`PartitionedGradients` (stage 1 keeps the full gradient, stage 2
only its chunk). This is P_os (stage 1) and P_os+g (stage 2) of Rajbhandari et al. 2020.

Because a torch optimizer updates each master chunk elementwise, the result equals updating
whole parameters only for elementwise optimizers (Adam, AdamW, SGD, Adagrad, Lion, ...);
others must be allowed with ``zero_allow_untested_optimizer``, as in DeepSpeed.
"""
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

from deepscale import comm as dist
from deepscale.runtime.checkpoint.expert_files import checkpoint_param_names
from deepscale.runtime.checkpoint.portable import OwnedFragment, export_shard, import_shards
from deepscale.runtime.expert_grads import split_by_expert_group
from deepscale.runtime.offload import OptimizerOffload, OptimizerOffloadSettings, offload_settings_from_config
from deepscale.runtime.offload.planner import check_offload_plan, sizes_for
from deepscale.runtime.precision.precision_optimizer import PrecisionOptimizer
from deepscale.runtime.training_optimizer import TrainingOptimizer
from deepscale.runtime.zero.collectives import all_gather_flat, pick_methods
from deepscale.runtime.zero.grad_partitioner import PartitionedGradients, ZeroBucket
from deepscale.runtime.zero.memory import estimate_zero2_model_states_mem_needs_all_live
from deepscale.runtime.zero.partition import order_buckets, plan_group_buckets
from deepscale.runtime.zero.zero_access import FullTensorAccess
from deepscale.utils.logging import logger

__all__ = ["ZeroOptimizer", "check_optimizer_is_tested", "estimate_zero2_model_states_mem_needs_all_live",
           "zero_optimizer_kwargs"]

# Stage 2 stages a bucket's full gradient until its reduction: buckets larger than this (16 MB
# of fp32) would bring back the full-gradient memory stage 2 exists to remove, so
# reduce_bucket_size is capped here (fewer, larger collectives gain nothing beyond this size).
STAGE2_MAX_BUCKET_NUMEL = 1 << 22

# Optimizers whose update is elementwise, so a flat chunk update equals the whole-tensor one.
_TESTED_OPTIMIZER_NAMES = {"Adam", "AdamW", "SGD", "Adagrad", "Lion", "DeepScaleCPUAdam", "FusedAdam",
                           "DeepScaleCPUAdagrad", "DeepScaleCPULion", "RMSprop", "Adamax", "NAdam", "RAdam"}


def check_optimizer_is_tested(optimizer, allow_untested: bool) -> None:
    """Refuse optimizers whose update is not known to be elementwise unless allowed."""
    name = type(optimizer).__name__
    if name not in _TESTED_OPTIMIZER_NAMES and not allow_untested:
        raise ValueError(f"ZeRO stage 1/2 updates flat partitions of the parameters; {name} is not known to be an "
                         f"elementwise optimizer, so results may differ from unpartitioned training. Set "
                         f"'zero_allow_untested_optimizer': true to use it anyway (tested: "
                         f"{', '.join(sorted(_TESTED_OPTIMIZER_NAMES))})")


class ZeroOptimizer(TrainingOptimizer):
    """The ZeRO stage 1/2 training optimizer (interface: ``runtime/dp_optimizer.py``).

    Args:
        module: the model, on its device, still fp32 (masters are cloned before the cast).
        basic_optimizer: the torch optimizer over the model parameters (required).
        stage: 1 (partition optimizer states) or 2 (and gradients).
        model_dtype: dtype the model will be cast to before :meth:`attach`.
        loss_scaler, clip_grad: see :class:`PrecisionOptimizer`.
        group, world_size: the data-parallel group.
        bucket_numel: ``reduce_bucket_size`` in elements (at stage 2 at most
            ``STAGE2_MAX_BUCKET_NUMEL``). Default 500M.
        allgather_bucket_numel: ``allgather_bucket_size``: elements of all-gathers in flight
            before waiting. Default 500M.
        accum_dtype, comm_dtype, predivide_factor: gradient accumulation/communication dtypes.
        overlap_comm, reduce_scatter, allgather_partitions: the DeepSpeed switches.
        ignore_unused_parameters: False raises when a parameter gets no gradient. Default True.
        allow_untested_optimizer: ``zero_allow_untested_optimizer``. Default False.
        offload_optimizer: where the fp32 masters, gradient chunks and states live
            (``runtime/offload``); None or device "none" keeps them with the model. Default None.
    """

    def __init__(self, module: torch.nn.Module, basic_optimizer, stage: int, model_dtype: torch.dtype,
                 loss_scaler=None, clip_grad: float = 0.0, group=None,
                 world_size: int = 1, bucket_numel: int = 500_000_000, allgather_bucket_numel: int = 500_000_000,
                 accum_dtype: torch.dtype = torch.float32, comm_dtype: Optional[torch.dtype] = None,
                 predivide_factor: float = 1.0, overlap_comm: bool = True, reduce_scatter: bool = True,
                 allgather_partitions: bool = True, ignore_unused_parameters: bool = True,
                 allow_untested_optimizer: bool = False, offload_optimizer: Optional[OptimizerOffloadSettings] = None):
        if stage not in (1, 2):
            raise ValueError(f"zero_optimization.stage must be 1 or 2 for ZeroOptimizer, got {stage}")
        if basic_optimizer is None:
            raise ValueError(f"zero_optimization.stage={stage} partitions optimizer state, so it needs an optimizer: "
                             "add an 'optimizer' section to the config or pass optimizer= to initialize()")
        check_optimizer_is_tested(basic_optimizer, allow_untested_optimizer)
        if allgather_bucket_numel < 1:
            raise ValueError(f"zero_optimization.allgather_bucket_size must be positive, got {allgather_bucket_numel}")
        self.stage, self.model_dtype = stage, model_dtype
        self.group, self.world_size = group, world_size
        self.rank = dist.get_rank(group) if world_size > 1 else 0
        self.basic = basic_optimizer
        self._loss_scaler, self._clip_grad = loss_scaler, clip_grad
        self.allgather_bucket_numel = int(allgather_bucket_numel)
        self.ignore_unused_parameters = ignore_unused_parameters
        backend = dist.get_backend(group) if world_size > 1 else "none"
        reduce_method, self.gather_method = pick_methods(backend, reduce_scatter, allgather_partitions)
        self._grad_args = dict(accum_dtype=accum_dtype, comm_dtype=comm_dtype, overlap_comm=overlap_comm,
                               reduce_method=reduce_method, predivide_factor=predivide_factor)
        self._module = module
        # expert parameters under their global expert names (checkpoint/expert_files.py)
        self.param_names: Dict[torch.nn.Parameter, str] = checkpoint_param_names(module)
        layout_numel = int(bucket_numel) if stage == 1 else min(int(bucket_numel), STAGE2_MAX_BUCKET_NUMEL)
        self.buckets = self._plan(module, layout_numel)
        if self.basic.state:
            logger.warning("the optimizer passed to ZeRO already has state; it is dropped (states are rebuilt "
                           "per partition)")
            self.basic.state.clear()
        self._masters: List[Optional[torch.Tensor]] = [None] * len(self.buckets)
        if model_dtype != torch.float32:
            self._masters = [self._clone_master(bucket) for bucket in self.buckets]
        self.precision: Optional[PrecisionOptimizer] = None
        self.grads: Optional[PartitionedGradients] = None
        self.model_buffers: List[torch.Tensor] = []
        self._offload_settings = offload_optimizer if offload_optimizer is not None and offload_optimizer.enabled \
            else None
        self.offload: Optional[OptimizerOffload] = None
        self._sync = True

    # --- construction ---------------------------------------------------------------------
    def _plan(self, module: torch.nn.Module, bucket_numel: int) -> List[ZeroBucket]:
        registration = {p: i for i, p in enumerate(module.parameters())}
        self.group_params: List[List[torch.nn.Parameter]] = []
        plans, members, comms = [], [], []
        dense_comm = (self.group, self.world_size, self.rank)
        for group_index, group in enumerate(self.basic.param_groups):
            trainable = [p for p in group["params"] if p.requires_grad]
            self.group_params.append(trainable)
            # Expert parameters are partitioned over their expert-data-parallel group (expert_grads.py).
            dense, experts = split_by_expert_group(trainable)
            subsets = [(dense, dense_comm)] + [(params, (g.edp_group, g.edp_size, g.edp_rank)) for g, params in experts]
            position = {id(p): i for i, p in enumerate(trainable)}
            for subset, comm in subsets:
                for plan in plan_group_buckets(group_index, [p.numel() for p in subset], bucket_numel, comm[1]):
                    plan.param_indices = [position[id(subset[i])] for i in plan.param_indices]
                    plans.append(plan)
                    members.append([trainable[i] for i in plan.param_indices])
                    comms.append(comm)
        # Backward reaches the earliest-registered parameter last: a bucket is complete when its
        # earliest-registered parameter has reported.
        keys = [-min(registration.get(p, len(registration)) for p in params) for params in members]
        by_plan = {id(plan): (params, comm) for plan, params, comm in zip(plans, members, comms)}
        managed = {p for params in members for p in params}
        stray = [n for p, n in self.param_names.items() if p.requires_grad and p not in managed]
        if stray:
            logger.warning(f"{len(stray)} trainable parameter(s) are not in the optimizer and will not be updated "
                           f"by ZeRO, e.g. {stray[:3]}")
        return [ZeroBucket(plan, *by_plan[id(plan)]) for plan in order_buckets(plans, keys)]

    @torch.no_grad()
    def _clone_master(self, bucket: ZeroBucket) -> torch.Tensor:
        plan = bucket.plan
        master = torch.zeros(plan.chunk, dtype=torch.float32, device=bucket.params[0].device)
        for position, param in enumerate(bucket.params):
            frag = plan.fragment(bucket.rank, position)
            if frag is not None:
                master[frag.chunk_offset:frag.chunk_offset + frag.numel].copy_(
                    param.detach().reshape(-1)[frag.param_start:frag.param_start + frag.numel])
        return torch.nn.Parameter(master)

    @torch.no_grad()
    def attach(self) -> None:
        """Move parameters into the flat buffers, install masters and gradient hooks.

        Call once the model has its final dtype and device.
        """
        if self._offload_settings is not None:  # before anything is allocated
            check_offload_plan(self._offload_settings, sum(sum(b.plan.numels) for b in self.buckets), self.stage,
                               self.world_size, sizes_for(self.model_dtype, self.basic, self._grad_args["accum_dtype"]),
                               group=self.group)
        for index, bucket in enumerate(self.buckets):
            plan = bucket.plan
            flat = torch.zeros(plan.padded, dtype=bucket.params[0].dtype, device=bucket.params[0].device)
            for param, offset, numel in zip(bucket.params, plan.offsets, plan.numels):
                flat[offset:offset + numel].copy_(param.detach().reshape(-1))
                param.data = flat[offset:offset + numel].view(param.shape)
            self.model_buffers.append(flat)
            if self._masters[index] is None:  # fp32 model: the master is the model's own chunk
                self._masters[index] = torch.nn.Parameter(self._own_chunk(bucket, flat))
        on_reduced = self._stream_grad_to_host if self._offload_settings is not None else None
        self.grads = PartitionedGradients(self.buckets, self.stage, self.rank, self.world_size, self.group,
                                          param_names=self.param_names, on_reduced=on_reduced, **self._grad_args)
        if self._offload_settings is not None:
            self.offload = OptimizerOffload(self._offload_settings, self.basic, self._masters,
                                            [b.plan.group_index for b in self.buckets], self._publish_range,
                                            rank=dist.get_rank() if dist.is_initialized() else 0, group=self.group,
                                            grad_buffers=self.grads.own_grads())
            self._masters = list(self.offload.masters)
        for group_index, group in enumerate(self.basic.param_groups):
            group["params"] = [self._masters[i] for i, b in enumerate(self.buckets)
                               if b.plan.group_index == group_index]
        self.precision = PrecisionOptimizer(self.basic, model_dtype=torch.float32, loss_scaler=self._loss_scaler,
                                            clip_grad=self._clip_grad, offload=self.offload)
        access = FullTensorAccess(self)
        for bucket in self.buckets:
            for param in bucket.params:
                param._deepscale_full_access = access

    def _own_chunk(self, bucket: ZeroBucket, flat: torch.Tensor) -> torch.Tensor:
        chunk = bucket.plan.chunk
        return flat[bucket.rank * chunk:(bucket.rank + 1) * chunk]

    @torch.no_grad()
    def _publish_range(self, index: int, start: int, values: torch.Tensor) -> None:
        """Offload: copy updated master values of bucket ``index`` into the rank's chunk of the model."""
        own = self._own_chunk(self.buckets[index], self.model_buffers[index])[start:start + values.numel()]
        if own.data_ptr() != values.data_ptr():  # on a CPU accelerator an fp32 master is the chunk itself
            own.copy_(values)

    # --- backward -------------------------------------------------------------------------
    def prepare_backward(self, sync: bool) -> None:
        self._sync = sync
        self.grads.begin_backward(reducing=sync or self.stage == 2)

    @torch.no_grad()
    def _stream_grad_to_host(self, bucket: ZeroBucket) -> None:
        # Offload: a bucket's reduced chunk goes to the host as soon as it is final (stage 2
        # reduces every micro-step; only the boundary's result is final), in bucket order,
        # while backward still runs. non_blocking: the host step synchronizes first.
        host = self.offload.grads[bucket.index]
        if self._sync and host.data_ptr() != bucket.own_grad.data_ptr():
            host.copy_(bucket.own_grad, non_blocking=True)

    def abort_backward(self) -> None:
        self.grads.abort_backward()

    def finish_backward(self, sync: bool) -> None:
        missing = self.grads.finish_backward(sync)
        self._note_backward()
        if missing and not self.ignore_unused_parameters:
            names = [self.param_names.get(p, "?") for p in missing]
            raise RuntimeError(f"{len(names)} parameter(s) got no gradient in this backward, e.g. {names[:3]}; set "
                               "zero_optimization.ignore_unused_parameters to true to allow unused parameters")

    @property
    def has_pending_grads(self) -> bool:
        return self.grads.has_pending_grads

    # --- step -----------------------------------------------------------------------------
    def _attach_step_grads(self) -> List[torch.Tensor]:
        if self.offload is not None:
            return self.offload.step_grads()
        grads = self.grads.own_grads()
        for master, grad in zip(self._masters, grads):
            master.grad = grad if grad.dtype == torch.float32 else grad.float()
        return grads

    def _local_grad_parts(self, params) -> List[torch.Tensor]:
        parts = []
        for param in params:
            try:
                bucket, position = self.grads.location(param)
            except KeyError:  # frozen or not managed here
                continue
            frag = bucket.plan.fragment(self.rank, position)
            if frag is not None:
                parts.append(bucket.own_grad[frag.chunk_offset:frag.chunk_offset + frag.numel])
        return parts

    def _publish_masters(self) -> None:
        if self.offload is not None:
            self.offload.publish()
        self.all_gather_params()

    def _finish_delayed_update(self) -> None:
        """Offload with DPU: bring a delayed update in flight into the model (checkpoints, destroy)."""
        if self.offload is not None and self.offload.finish():
            self.all_gather_params()

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Refresh every rank's model parameters from the owners' master chunks."""
        handles, inflight = [], 0
        for bucket, master, flat in zip(self.buckets, self._masters, self.model_buffers):
            own = self._own_chunk(bucket, flat)
            if self.offload is None and own.data_ptr() != master.data_ptr():
                own.copy_(master)
            if bucket.world_size == 1:
                continue
            handles += all_gather_flat(flat, bucket.rank, bucket.world_size, bucket.group, self.gather_method)
            inflight += bucket.plan.padded
            if inflight >= self.allgather_bucket_numel:
                for handle in handles:
                    handle.wait()
                handles, inflight = [], 0
        for handle in handles:
            handle.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grads.zero()
        self.precision.zero_grad()
        for bucket in self.buckets:
            for param in bucket.params:
                param.grad = None

    # --- what the engine and users read ---------------------------------------------------
    @property
    def basic_optimizer(self):
        return self.basic

    @property
    def user_optimizer(self):
        return self

    @property
    def masters(self) -> List[torch.Tensor]:
        """The fp32 master chunk of every bucket (what the torch optimizer updates)."""
        return list(self._masters)

    # --- checkpoints ----------------------------------------------------------------------
    saves_per_rank = True

    def owned_fragments(self) -> List[OwnedFragment]:
        """The parts of named parameters whose fp32 state this rank holds."""
        out = []
        for bucket, master in zip(self.buckets, self._masters):
            for position, param in enumerate(bucket.params):
                frag = bucket.plan.fragment(bucket.rank, position)
                if frag is not None and param in self.param_names:
                    out.append(OwnedFragment(self.param_names[param], tuple(param.shape), frag.param_start,
                                             frag.numel, master, frag.chunk_offset, bucket.plan.group_index))
        return out

    def _resident(self, writeback: bool):
        """Offload to NVMe: masters and states in host memory while active (see ``OptimizerOffload.resident``)."""
        self._finish_delayed_update()
        return self.offload.resident(writeback) if self.offload is not None else nullcontext()

    def _publish_all_masters(self) -> None:
        if self.offload is not None:
            for index, master in enumerate(self._masters):
                self._publish_range(index, 0, master.detach())
        self.all_gather_params()

    def state_dict(self) -> dict:
        """This rank's portable shard (see ``runtime/checkpoint/portable.py``)."""
        names = [[self.param_names.get(p, "") for p in params] for params in self.group_params]
        with self._resident(writeback=False):
            return export_shard(self.basic, self.owned_fragments(), names, self._loss_scaler, self.stage)

    def load_state_dict(self, state: dict, load_optimizer_states: bool = True) -> None:
        """Load from one shard dict (e.g. one saved at world size 1, or by stage 0)."""
        self.load_shards([state], load_optimizer_states=load_optimizer_states)

    def load_shards(self, shards, load_optimizer_states: bool = True) -> None:
        """Load this rank's fragments from every shard of a checkpoint, then refresh the model."""
        with self._resident(writeback=True):
            import_shards(shards, self.basic, self.owned_fragments(), self._loss_scaler, load_optimizer_states)
            self._publish_all_masters()

    @torch.no_grad()
    def reseed_masters(self, module: torch.nn.Module, module_state: dict) -> None:
        """Set the fp32 master chunks from saved (whole) weights, e.g. after ``load_module_only``."""
        with self._resident(writeback=True):
            for frag in self.owned_fragments():
                if frag.name in module_state:
                    flat = module_state[frag.name].reshape(-1)[frag.start:frag.start + frag.numel]
                    frag.master_view().copy_(flat.float())
            if self.offload is not None:
                self._publish_all_masters()

    def destroy(self) -> None:
        if self.offload is not None:
            self._finish_delayed_update()
            self.offload.close()
        if self.grads is not None:
            self.grads.remove_hooks()
            self.grads.storage = torch.empty(0)
        for bucket in self.buckets:
            for param in bucket.params:
                if hasattr(param, "_deepscale_full_access"):
                    del param._deepscale_full_access


def zero_optimizer_kwargs(config) -> dict:
    """The :class:`ZeroOptimizer` arguments that come from the ``zero_optimization`` section."""
    zero = config.zero_optimization
    return dict(allgather_bucket_numel=int(zero.allgather_bucket_size), overlap_comm=bool(zero.overlap_comm),
                reduce_scatter=bool(zero.reduce_scatter), allgather_partitions=bool(zero.allgather_partitions),
                ignore_unused_parameters=bool(zero.ignore_unused_parameters),
                allow_untested_optimizer=bool(getattr(config, "zero_allow_untested_optimizer", False)),
                offload_optimizer=offload_settings_from_config(config))
