"""The ZeRO stage 3 training optimizer (interface: ``runtime/dp_optimizer.py``).

Note: what lives where (P_os+g+p of Rajbhandari et al. 2020). Every parameter is partitioned
(``zero_param.py``): rank ``r`` keeps its piece in the model dtype (``param.ds_tensor``), and
the fp32 masters of its trainable pieces are packed into one flat tensor per optimizer param
group, which is what the torch optimizer sees, so its states (Adam's moments) are ``1/N`` of
the model as well. Gradients are reduce-scattered group by group during backward and added,
divided by the world size, into one fp32 flat gradient per param group aligned with the
masters, so accumulation over micro-steps costs ``1/N`` of the gradients too. The step
unscales/clips with the global norm (one all-reduce of squared local norms) through
:class:`PrecisionOptimizer`, updates the masters, and copies them into the shards; only the
persistent groups are re-gathered. Checkpoints use the portable fragment format: the rank's
piece of each parameter is one fragment.
"""
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional

import torch

from deepscale import comm as dist
from deepscale.comm.expert_groups import expert_groups_of_param
from deepscale.runtime.checkpoint.expert_files import checkpoint_param_names
from deepscale.runtime.checkpoint.portable import OwnedFragment, export_shard, import_shards
from deepscale.runtime.offload import OptimizerOffload, OptimizerOffloadSettings, offload_settings_from_config
from deepscale.runtime.offload.param_offload import ParamOffload, param_offload_settings
from deepscale.runtime.offload.planner import check_offload_plan, sizes_for
from deepscale.runtime.precision.precision_optimizer import PrecisionOptimizer
from deepscale.runtime.training_optimizer import TrainingOptimizer
from deepscale.runtime.zero.stage3.collectives import CollectiveRunner, twin_group
from deepscale.runtime.zero.stage3.coordinator import ParamCoordinator
from deepscale.runtime.zero.stage3.external_check import PartitionedUseCheck
from deepscale.runtime.zero.stage3.full_access import Stage3TensorAccess
from deepscale.runtime.zero.stage3.grouping import DEFAULT_GROUP_NUMEL, build_groups
from deepscale.runtime.zero.stage3.hooks import install_module_hooks, remove_module_hooks
from deepscale.runtime.zero.stage3.param_group import ParamGroup
from deepscale.runtime.zero.stage3.sequence_check import debug_enabled_from_env
from deepscale.runtime.zero.stage3.state_dict import (full_state_dict, gather_full_weights, install_load_hooks,
                                                     serving_full_weights)
from deepscale.runtime.zero.stage3.states import TrainingState
from deepscale.runtime.zero.stage3.zero_param import is_zero_param, partition_param, shard_range, take_shard
from deepscale.runtime.zero.stage_1_and_2 import check_optimizer_is_tested
from deepscale.utils.logging import logger


class Stage3Optimizer(TrainingOptimizer):
    """ZeRO stage 3: parameters, gradients and optimizer states partitioned over the data-parallel ranks.

    Args:
        module: the model, on its device; fp32 (masters are taken before the cast) or already
            partitioned by ``deepscale.zero.Init``.
        basic_optimizer: the torch optimizer over the model parameters (required).
        model_dtype: dtype of the model (and of the shards).
        loss_scaler, clip_grad: see :class:`PrecisionOptimizer`.
        group, world_size: the data-parallel group.
        accum_dtype: dtype of the accumulated gradient partitions (fp32 recommended).
        comm_dtype: dtype gradients are reduce-scattered in. Default ``accum_dtype``.
        prefetch_numel: ``stage3_prefetch_bucket_size``. Default 50M.
        max_live_numel: ``stage3_max_live_parameters``. Default 1e9.
        max_reuse_distance: ``stage3_max_reuse_distance``. Default 1e9.
        persistence_threshold: ``stage3_param_persistence_threshold``. Default 100000.
        bucket_numel: ``reduce_bucket_size``: a parameter group (what one all-gather and one
            reduce-scatter carry) is closed at a module boundary once it reaches
            ``min(bucket_numel, 4M)`` elements. Default 500M.
        param_offload: ``zero_optimization.offload_param`` as
            :class:`~deepscale.runtime.offload.param_offload.ParamOffloadSettings`: keep the
            parameter shards in host memory or on NVMe between uses. Default None (not offloaded).
        debug: also sequence-check every reduce-scatter and check every forward for partitioned
            parameters used outside the modules that gather them (also ``DEEPSCALE_ZERO3_DEBUG=1``);
            all-gathers and phase ends are always checked. Default False.
        allow_untested_optimizer: ``zero_allow_untested_optimizer``. Default False.
        offload_optimizer: where the fp32 masters, gradient partition and states live
            (``runtime/offload``); None or device "none" keeps them with the shards. Default None.
        **unused: other training-optimizer arguments (``predivide_factor``) accepted for the
            shared constructor signature.
    """

    def __init__(self, module: torch.nn.Module, basic_optimizer, model_dtype: torch.dtype, loss_scaler=None,
                 clip_grad: float = 0.0, group=None, world_size: int = 1,
                 bucket_numel: int = 500_000_000, accum_dtype: torch.dtype = torch.float32,
                 comm_dtype: Optional[torch.dtype] = None,
                 prefetch_numel: int = 50_000_000, max_live_numel: int = 1_000_000_000,
                 max_reuse_distance: int = 1_000_000_000, persistence_threshold: int = 100_000,
                 debug: bool = False, allow_untested_optimizer: bool = False,
                 offload_optimizer: Optional[OptimizerOffloadSettings] = None, param_offload=None, **unused):
        if basic_optimizer is None:
            raise ValueError("zero_optimization.stage=3 partitions optimizer state, so it needs an optimizer: add an "
                             "'optimizer' section to the config or pass optimizer= to initialize()")
        check_optimizer_is_tested(basic_optimizer, allow_untested_optimizer)
        self.basic, self.model_dtype = basic_optimizer, model_dtype
        self.group, self.world_size = group, world_size
        self.rank = dist.get_rank(group) if world_size > 1 else 0
        self._loss_scaler, self._clip_grad = loss_scaler, clip_grad
        self._module = module
        self._offload_settings = offload_optimizer if offload_optimizer is not None and offload_optimizer.enabled \
            else None
        self.offload: Optional[OptimizerOffload] = None
        self._accum_dtype = accum_dtype
        # expert parameters under their global expert names (checkpoint/expert_files.py)
        self.param_names: Dict[torch.nn.Parameter, str] = checkpoint_param_names(module)
        self.debug = bool(debug) or debug_enabled_from_env()
        self.runner = CollectiveRunner(group, world_size, reduce_group=twin_group(group, world_size),
                                       check_reduces=self.debug)
        # Expert parameters are partitioned over their expert-data-parallel group (expert_grads.py).
        self._expert_runners = {}
        for groups in sorted({g.name: g for g in filter(None, map(expert_groups_of_param, module.parameters()))
                              }.values(), key=lambda g: g.name):
            self._expert_runners[groups.name] = (groups, CollectiveRunner(
                groups.edp_group, groups.edp_size, reduce_group=twin_group(groups.edp_group, groups.edp_size),
                check_reduces=self.debug))
        self.group_params = self._trainable_per_group()
        fp32_shards = self._partition(module)
        group_numel = max(1, min(int(bucket_numel), DEFAULT_GROUP_NUMEL))
        if param_offload is not None and param_offload.max_group_numel(world_size):
            group_numel = min(group_numel, param_offload.max_group_numel(world_size))  # a shard fits a swap buffer
        self.groups: List[ParamGroup] = build_groups(module, self.runner, group_numel, int(persistence_threshold),
                                                     self.param_names,
                                                     include=lambda p: expert_groups_of_param(p) is None)
        for name, (_, runner) in self._expert_runners.items():
            self.groups += build_groups(module, runner, group_numel, int(persistence_threshold), self.param_names,
                                        include=lambda p, n=name: getattr(expert_groups_of_param(p), "name", None) == n,
                                        first_index=len(self.groups))
        self.param_offload = None if param_offload is None else ParamOffload(param_offload, self.groups, group,
                                                                              world_size, debug=self.debug)
        self._build_masters(fp32_shards)
        comm_dtype = comm_dtype or accum_dtype
        self.coordinator = ParamCoordinator(self.groups, prefetch_numel, max_live_numel, max_reuse_distance,
                                            comm_dtype, self._accumulate, self.runner)
        self.coordinator.offload = self.param_offload
        managed = {id(p) for params in self.group_params for p in params}
        for g in self.groups:
            self.coordinator.trainable_of[g.index] = [p for p in g.params if id(p) in managed]
        self.precision: Optional[PrecisionOptimizer] = None
        self._handles, self._module_hooks = [], []
        self._pending_grads = False
        self._forwards = 0

    # --- construction ---------------------------------------------------------------------
    def _trainable_per_group(self) -> List[List[torch.nn.Parameter]]:
        out = []
        for group in self.basic.param_groups:
            out.append([p for p in group["params"] if p.requires_grad and p in self.param_names])
        managed = {id(p) for params in out for p in params}
        stray = [n for p, n in self.param_names.items() if p.requires_grad and id(p) not in managed]
        if stray:
            logger.warning(f"{len(stray)} trainable parameter(s) are not in the optimizer and will not be updated "
                           f"by ZeRO-3, e.g. {stray[:3]}")
        return out

    @torch.no_grad()
    def _partition(self, module: torch.nn.Module) -> Dict[int, torch.Tensor]:
        """Partition every parameter not yet partitioned; returns the fp32 pieces of the trainable ones."""
        managed = {id(p) for params in self.group_params for p in params}
        fp32 = {}
        for param, name in self.param_names.items():
            group, world_size, rank = self._comm_of(param)
            if is_zero_param(param):
                if param.ds_world_size != world_size:
                    raise ValueError(f"parameter {name} was partitioned by zero.Init over {param.ds_world_size} "
                                     f"ranks but its data-parallel group has {world_size} (expert parameters are "
                                     "partitioned over their expert-data-parallel group)")
                if id(param) in managed:
                    fp32[id(param)] = param.ds_tensor.detach().float().clone()
                if param.ds_tensor.dtype != self.model_dtype:
                    param.ds_tensor = param.ds_tensor.to(self.model_dtype)
                    param.data = torch.empty(0, dtype=self.model_dtype, device=param.ds_tensor.device)
                continue
            if id(param) in managed:
                fp32[id(param)] = take_shard(param.data.float(), rank, world_size)
            partition_param(param, group, world_size, rank, dtype=self.model_dtype)
        return fp32

    def _comm_of(self, param) -> tuple:
        """``(group, world_size, rank)`` that partitions ``param``."""
        groups = expert_groups_of_param(param)
        if groups is None:
            return self.group, self.world_size, self.rank
        return groups.edp_group, groups.edp_size, groups.edp_rank

    def _build_masters(self, fp32_shards: Dict[int, torch.Tensor]) -> None:
        self._masters: List[torch.Tensor] = []
        self._master_grads: List[torch.Tensor] = []
        self._slab_group: List[int] = []  # optimizer param group of each master
        self._slots: Dict[int, tuple] = {}  # id(param) -> (master index, offset, length)
        # Masters follow the parameter-group layout, so a group's pieces are one range of a
        # master and an fp32 model's shards can live in the master (_share_fp32_shards). With
        # offload, a param group's pieces are cut into masters ("slabs") of at most
        # sub_group_size elements (whole pieces), the unit the offloaded step swaps.
        position = {id(p): (g.index, i) for g in self.groups for i, p in enumerate(g.params)}
        limit = self._offload_settings.sub_group_size if self._offload_settings is not None else None
        for index, params in enumerate(self.group_params):
            params = sorted(params, key=lambda p: position.get(id(p), (len(self.groups), 0)))
            for slab in _cut_slabs(params, limit):
                master = torch.nn.Parameter(torch.cat([fp32_shards[id(p)] for p in slab]))
                slab_index, offset = len(self._masters), 0
                self._masters.append(master)
                self._slab_group.append(index)
                for param in slab:
                    length = param.ds_tensor.numel()
                    self._slots[id(param)] = (slab_index, offset, length)
                    offset += length
        if self._offload_settings is not None:
            largest = max((sum(p.ds_numel for p in m.parameters(recurse=False) if is_zero_param(p))
                           for m in self._module.modules()), default=0)
            check_offload_plan(self._offload_settings, sum(p.ds_numel for ps in self.group_params for p in ps), 3,
                               self.world_size, sizes_for(self.model_dtype, self.basic, self._accum_dtype),
                               group=self.group, largest_layer=largest)
            self.offload = OptimizerOffload(self._offload_settings, self.basic, self._masters, self._slab_group,
                                            self._publish_range, rank=dist.get_rank() if dist.is_initialized() else 0,
                                            group=self.group)
            self._masters, self._master_grads = list(self.offload.masters), list(self.offload.grads)
        else:
            self._master_grads = [torch.zeros_like(m.detach()) for m in self._masters]
        for params in self.group_params:
            for param in params:
                slab, offset, length = self._slots[id(param)]
                if self._masters[slab].numel():  # an NVMe master is an empty shell between steps
                    param._ds_master_view = self._masters[slab].detach()[offset:offset + length]
        if self.model_dtype == torch.float32 and self.param_offload is None and (
                self.offload is None or (self.offload.shares_host and self.offload.nvme is None)):
            self._share_fp32_shards()
        managed = [p for params in self.group_params for p in params
                   if self.offload is None and p.ds_tensor.data_ptr() != p._ds_master_view.data_ptr()]
        self._publish_params = managed
        self._publish_dst = [p.ds_tensor for p in managed]
        self._publish_src = [p._ds_master_view for p in managed]
        self._slab_params: List[List[torch.nn.Parameter]] = [[] for _ in self._masters]
        for params in self.group_params:
            for param in params:
                self._slab_params[self._slots[id(param)][0]].append(param)
        self._accumulate_plan = {}
        for g in self.groups:
            plan = [(self._master_grads[self._slots[id(p)][0]][self._slots[id(p)][1]:][:c], off, c)
                    for p, off, c in zip(g.params, g.offsets, g.chunks) if id(p) in self._slots]
            self._accumulate_plan[g.index] = plan

    @torch.no_grad()
    def _publish_range(self, slab: int, start: int, values: torch.Tensor) -> None:
        """Offload: copy updated master values ``[start, start + len)`` of ``slab`` into the shards."""
        end = start + values.numel()
        for param in self._slab_params[slab]:
            _, offset, length = self._slots[id(param)]
            begin, stop = max(offset, start), min(offset + length, end)
            if begin < stop and self.param_offload is not None:
                self.param_offload.open_for_write(param._ds_group)  # stored by publish_masters
            dst, src = param.ds_tensor[begin - offset:stop - offset], values[begin - start:stop - start]
            if begin < stop and dst.data_ptr() != src.data_ptr():  # a shared fp32 shard is the master itself
                dst.copy_(src)

    def _share_fp32_shards(self) -> None:
        """An fp32 model's shards equal its masters: let each group whose pieces are one range of
        a master use that range as its shard, instead of a second copy (saves 4 bytes x Psi / N)."""
        for g in self.groups:
            slots = [self._slots.get(id(p)) for p in g.params]
            if None in slots or len({slot[0] for slot in slots}) != 1:
                continue
            index, start = slots[0][0], slots[0][1]
            if all(slot[1] == start + offset for slot, offset in zip(slots, g.offsets)):
                g.use_shard_storage(self._masters[index].detach()[start:start + g.shard_numel])

    @torch.no_grad()
    def attach(self) -> None:
        """Install masters, hooks and state-dict hooks; gather persistent groups. Call after the dtype cast."""
        for index, group in enumerate(self.basic.param_groups):
            group["params"] = [m for m, g in zip(self._masters, self._slab_group) if g == index]
        if self.basic.state:
            logger.warning("the optimizer passed to ZeRO-3 already has state; it is dropped (states are rebuilt per "
                           "partition)")
            self.basic.state.clear()
        self.precision = PrecisionOptimizer(self.basic, model_dtype=torch.float32, loss_scaler=self._loss_scaler,
                                            clip_grad=self._clip_grad, offload=self.offload)
        self._module_hooks = install_module_hooks(self._module, self.coordinator)
        for g in self.groups:
            for param in self.coordinator.trainable_of[g.index]:
                self._handles.append(param.register_post_accumulate_grad_hook(self._on_grad))
        for param, name in self.param_names.items():
            if param.requires_grad and id(param) not in self._slots:
                self._handles.append(param.register_post_accumulate_grad_hook(self._drop_own_grad))
        self._handles.extend(install_load_hooks(self._module))
        access = Stage3TensorAccess(self)
        for params in self.group_params:
            for param in params:
                param._deepscale_full_access = access
        self._refresh_persistent()

    def _drop_own_grad(self, param: torch.nn.Parameter) -> None:
        if self.coordinator.armed:  # another backward's gradients stay, as in PyTorch
            _drop_grad(param)

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        self.coordinator.grad_ready(param, param._ds_group)

    @torch.no_grad()
    def _accumulate(self, group: ParamGroup, output: torch.Tensor) -> None:
        plan = self._accumulate_plan[group.index]
        if not plan:
            return
        if output.dtype != torch.float32 or output.device != plan[0][0].device:
            # offload: the partition accumulates on the host
            output = output.to(device=plan[0][0].device, dtype=torch.float32)
        torch._foreach_add_([dst for dst, _, _ in plan], [output[off:off + c] for _, off, c in plan],
                            alpha=1.0 / self.world_size)

    @torch.no_grad()
    def _refresh_persistent(self) -> None:
        # Gathered copies are stale once the shards change: persistent groups are gathered
        # again, any other group still gathered is released (it is gathered again when used).
        for g in self.groups:
            if g.persistent:
                g.release()
                g.finish_gather()
            elif not g.is_sharded:
                g.users = 0
                self.coordinator.release(g, force=True)

    # --- forward / backward ---------------------------------------------------------------
    def forward_context(self):
        """Wraps the engine's forward: the first forward (every one in debug mode) checks for
        partitioned parameters used outside the modules that gather them."""
        self._forwards += 1
        if self._forwards == 1 or self.debug:
            return PartitionedUseCheck(self.param_names, self.coordinator.current_module)
        return nullcontext()

    def prepare_backward(self, sync: bool) -> None:
        """Gradients are reduce-scattered every micro-step, so ``sync`` changes nothing."""
        self.coordinator.close_stray_backward()
        self.coordinator.armed = True

    def abort_backward(self) -> None:
        """The backward raised: take no more gradients (the next entry closes it)."""
        self.coordinator.armed = False

    def finish_backward(self, sync: bool) -> None:
        self.coordinator.armed = False
        self.coordinator.end_backward()
        self._pending_grads = True
        self._note_backward()

    @property
    def has_pending_grads(self) -> bool:
        return self._pending_grads

    # --- step -----------------------------------------------------------------------------
    def _attach_step_grads(self) -> List[torch.Tensor]:
        if self.offload is not None:
            return self.offload.step_grads()
        for master, grad in zip(self._masters, self._master_grads):
            master.grad = grad
        return list(self._master_grads)

    def _local_grad_parts(self, params) -> List[torch.Tensor]:
        parts = []
        for param in params:
            slot = self._slots.get(id(param))
            if slot is not None and self._master_grads[slot[0]] is not None:
                parts.append(self._master_grads[slot[0]][slot[1]:slot[1] + slot[2]])
        return parts

    def _publish_masters(self) -> None:
        if self.offload is not None:
            self.offload.publish()
        self.publish_masters()

    def step(self) -> bool:
        """Unscale, clip, check overflow and update the fp32 masters; publish them into the shards."""
        self.coordinator.close_stray_backward()
        self.coordinator.training.to(TrainingState.STEP)
        try:
            applied = super().step()
            for runner in [self.runner] + [r for _, r in self._expert_runners.values()]:
                runner.step += 1
        finally:
            self.coordinator.training.to(TrainingState.IDLE)
        return applied

    @torch.no_grad()
    def publish_masters(self) -> None:
        """Copy the fp32 masters into the shards and refresh the persistent groups."""
        if self.param_offload is not None:
            self.param_offload.publish(self._publish_params, self._publish_src)  # also stores _publish_range's
        elif self._publish_dst and (self.offload is None or self.offload.nvme is None):
            torch._foreach_copy_(self._publish_dst, self._publish_src)
        self._refresh_persistent()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for grad in self._master_grads:
            grad.zero_()
        if self.precision is not None:
            self.precision.zero_grad()
        self._pending_grads = False

    # --- what the engine and users read ---------------------------------------------------
    @property
    def basic_optimizer(self):
        return self.basic

    @property
    def user_optimizer(self):
        return self

    @property
    def masters(self) -> List[torch.Tensor]:
        return list(self._masters)

    def empty_partition_cache(self) -> None:
        """Release every gathered (non-persistent) group."""
        self.coordinator.release_all()

    # --- module weights -------------------------------------------------------------------
    def consolidated_state_dict(self, rank0_only: bool = True, dtype: Optional[torch.dtype] = None):
        """The full module state dict on CPU (on rank 0 only by default); every rank must call it."""
        return full_state_dict(self._module, self.groups, rank0_only=rank0_only, dtype=dtype)

    @contextmanager
    def module_state_context(self):
        """While active, ``module.state_dict()`` on rank 0 returns whole weights (a collective on entry)."""
        full = gather_full_weights(self.groups, keep=self.rank == 0)
        with serving_full_weights(self._module, full):
            yield

    # --- checkpoints ----------------------------------------------------------------------
    saves_per_rank = True

    def owned_fragments(self) -> List[OwnedFragment]:
        """The rank's piece of each trainable parameter, as portable fragments."""
        out = []
        for index, params in enumerate(self.group_params):
            for param in params:
                slab, offset, _ = self._slots[id(param)]
                begin, end = shard_range(param.ds_numel, param.ds_rank, param.ds_world_size)
                if end > begin:
                    out.append(OwnedFragment(self.param_names[param], tuple(param.ds_shape), begin, end - begin,
                                             self._masters[slab], offset, index))
        return out

    def _resident(self, writeback: bool):
        """Offload to NVMe: masters and states in host memory while active (``OptimizerOffload.resident``)."""
        self._finish_delayed_update()
        return self.offload.resident(writeback) if self.offload is not None else nullcontext()

    def _finish_delayed_update(self) -> None:
        if self.offload is not None and self.offload.finish():
            self.publish_masters()

    def _publish_all_masters(self) -> None:
        if self.offload is not None:
            for index, master in enumerate(self._masters):
                self._publish_range(index, 0, master.detach())
        self.publish_masters()

    def state_dict(self) -> dict:
        """This rank's portable shard (``runtime/checkpoint/portable.py``)."""
        names = [[self.param_names[p] for p in params] for params in self.group_params]
        with self._resident(writeback=False):
            return export_shard(self.basic, self.owned_fragments(), names, self._loss_scaler, zero_stage=3)

    def load_state_dict(self, state: dict, load_optimizer_states: bool = True) -> None:
        self.load_shards([state], load_optimizer_states=load_optimizer_states)

    def load_shards(self, shards, load_optimizer_states: bool = True) -> None:
        """Load this rank's fragments from every shard of a checkpoint (any stage, any world size)."""
        with self._resident(writeback=True):
            import_shards(shards, self.basic, self.owned_fragments(), self._loss_scaler, load_optimizer_states)
            self._publish_all_masters()

    @torch.no_grad()
    def reseed_masters(self, module: torch.nn.Module, module_state: dict) -> None:
        """Set the fp32 masters from whole saved weights (``load_module_only``)."""
        with self._resident(writeback=True):
            for frag in self.owned_fragments():
                if frag.name in module_state:
                    flat = module_state[frag.name].reshape(-1)[frag.start:frag.start + frag.numel]
                    frag.master_view().copy_(flat.float())
            self._publish_all_masters()

    def destroy(self) -> None:
        if self.offload is not None:
            self._finish_delayed_update()
            self.offload.close()
        if self.param_offload is not None:
            self.param_offload.close()
        remove_module_hooks(self._module, self._module_hooks)
        for handle in self._handles:
            handle.remove()
        self._module_hooks, self._handles = [], []
        for params in self.group_params:
            for param in params:
                if hasattr(param, "_deepscale_full_access"):
                    del param._deepscale_full_access


def _cut_slabs(params: List[torch.nn.Parameter], limit: Optional[int]) -> List[List[torch.nn.Parameter]]:
    """Consecutive runs of ``params`` whose pieces total at most ``limit`` elements (one run without a limit)."""
    if not params:
        return []
    if limit is None:
        return [params]
    out, total = [[]], 0
    for param in params:
        numel = param.ds_tensor.numel()
        if out[-1] and total + numel > limit:
            out.append([])
            total = 0
        out[-1].append(param)
        total += numel
    return out


def _drop_grad(param: torch.nn.Parameter) -> None:
    # A trainable parameter the optimizer does not update: its gradient is not needed.
    param.grad = None


def stage3_optimizer_kwargs(config) -> dict:
    """The :class:`Stage3Optimizer` arguments that come from the ``zero_optimization`` section."""
    zero = config.zero_optimization
    return dict(prefetch_numel=int(zero.prefetch_bucket_size), max_live_numel=int(zero.max_live_parameters),
                max_reuse_distance=int(zero.max_reuse_distance),
                persistence_threshold=int(zero.param_persistence_threshold),
                debug=bool(getattr(zero, "debug_sequence_check", False)), param_offload=param_offload_settings(config),
                allow_untested_optimizer=bool(getattr(config, "zero_allow_untested_optimizer", False)),
                offload_optimizer=offload_settings_from_config(config))
