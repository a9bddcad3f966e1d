"""Stage-0 training optimizer: replicated states, bucketed gradient all-reduce.

Note: the training-optimizer interface. The engine talks to one object for everything that
touches gradients and optimizer state, so each ZeRO stage can bring its own:
  ``prepare_backward(sync)``   before ``loss.backward()``; ``sync``: this backward ends an
                               accumulation window and gradients must be averaged
  ``finish_backward(sync)``    after it; on sync, averaged gradients are ready afterwards
  ``step() -> bool``           unscale/clip/overflow check/update; False if skipped
  ``zero_grad()``, ``loss_scale``, ``last_grad_norm``, ``param_groups``,
  ``user_optimizer`` (what initialize returns), ``basic_optimizer`` (the torch optimizer),
  ``has_pending_grads``, ``reseed_masters(module, module_state_dict)``, ``destroy()``.
Checkpoints (see ``runtime/checkpoint/portable.py``): ``state_dict()`` returns this rank's
portable shard, ``load_shards(shards, load_optimizer_states)`` fills this rank's state from all
shards of a checkpoint, ``load_state_dict(shard)`` from one; ``saves_per_rank`` tells whether
every rank writes a shard (ZeRO) or rank 0 alone (replicated state).

Stage 1 and 2 live in ``runtime/zero/stage_1_and_2.py`` (``ZeroOptimizer``); the step they all
share is :class:`~deepscale.runtime.training_optimizer.TrainingOptimizer`.
"""
import torch

from deepscale.comm.expert_groups import expert_groups_of_param
from deepscale.runtime.checkpoint.expert_files import checkpoint_param_names
from deepscale.runtime.checkpoint.portable import export_shard, fragments_of_whole_params, import_shards
from deepscale.runtime.expert_grads import GradientReducerSet
from deepscale.runtime.precision.precision_optimizer import PrecisionOptimizer
from deepscale.runtime.training_optimizer import TrainingOptimizer
from deepscale.runtime.zero.zero_access import WholeTensorAccess
from deepscale.utils.logging import warning_once


class DataParallelOptimizer(TrainingOptimizer):
    """ZeRO stage 0: every rank holds all states; gradients are all-reduced in buckets.

    Args:
        module: the model (already on its device, still fp32 when masters are needed).
        basic_optimizer: the torch optimizer over the model parameters, or None.
        model_dtype: dtype the model will be cast to.
        loss_scaler: loss scaler for fp16, else None.
        clip_grad: global-norm clipping threshold; 0 disables.
        group, world_size: the data-parallel group.
        bucket_numel, accum_dtype, comm_dtype, predivide_factor: see :class:`GradientReducer`.
    """

    def __init__(self, module: torch.nn.Module, basic_optimizer, model_dtype: torch.dtype, loss_scaler,
                 clip_grad: float, group, world_size: int, bucket_numel: int,
                 accum_dtype: torch.dtype, comm_dtype: torch.dtype, predivide_factor: float = 1.0):
        self.precision = None
        if basic_optimizer is not None:
            self.precision = PrecisionOptimizer(basic_optimizer, model_dtype=model_dtype, loss_scaler=loss_scaler,
                                                clip_grad=clip_grad)
        self._module = module
        self.group, self.world_size = group, world_size
        self.reducer = None
        self._reducer_args = dict(group=group, world_size=world_size, bucket_numel=bucket_numel,
                                  accum_dtype=accum_dtype, comm_dtype=comm_dtype, predivide_factor=predivide_factor)

    def attach(self) -> None:
        """Install the gradient hooks; call once the model has its final dtype and device."""
        params = [p for p in self._module.parameters() if p.requires_grad]
        self.reducer = GradientReducerSet(params, **self._reducer_args)
        if self.precision is not None:
            access = WholeTensorAccess(self.precision.master_of, self.reducer.grad_view, self.precision.optimizer)
            for param in params:
                if self.precision.has_param(param):
                    param._deepscale_full_access = access

    # --- backward -------------------------------------------------------------------------
    grads_partitioned = False  # every rank holds the whole averaged gradient

    def prepare_backward(self, sync: bool) -> None:
        self.reducer.begin_backward(sync)

    def abort_backward(self) -> None:
        self.reducer.abort_backward()

    def finish_backward(self, sync: bool) -> None:
        self.reducer.end_backward(sync)
        self._note_backward()

    @property
    def has_pending_grads(self) -> bool:
        return self.reducer.has_pending_grads

    # --- step -----------------------------------------------------------------------------
    def _attach_step_grads(self):
        if self.reducer.foreign_after_sync:
            warning_once("a backward outside engine.backward() reached this engine's parameters after its last "
                         "engine.backward() and before engine.step(); at ZeRO stage 0 with an fp32 model its "
                         "gradients are applied without averaging over ranks, otherwise at the next step. Clear "
                         "them with the module's zero_grad() or run that backward before engine.backward()")
        for param in self.reducer.params:
            if self.precision.has_param(param):
                self.precision.set_master_grad(param, self.reducer.grad_view(param))
        return self.reducer.buffers

    def global_grad_norm(self, grads):
        """Every rank holds the whole averaged dense gradient; expert gradients are summed over
        the expert-parallel group (``runtime/expert_grads.py``)."""
        squares = self.reducer.squared_norm()
        if self.reduce_norm_squares is not None:  # the other pipeline stages' share
            squares = self.reduce_norm_squares(squares)
        return squares.sqrt().float()

    def _local_grad_parts(self, params):
        managed = set(self.reducer.params)
        return [self.reducer.grad_view(p) for p in params if p in managed]

    def zero_grad(self) -> None:
        if self.precision is not None:
            self.precision.zero_grad()
        self.reducer.zero()  # re-attaches the bucket views that precision.zero_grad dropped

    # --- what the engine reports ----------------------------------------------------------
    @property
    def user_optimizer(self):
        """The precision wrapper with fp16/bf16 masters, else the torch optimizer itself."""
        if self.precision is None:
            return None
        return self.precision if self.precision.uses_master_copies else self.precision.optimizer

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def saves_per_rank(self) -> bool:
        """The state is replicated, so rank 0 writes the only shard; with expert parallelism the
        experts differ between ranks, so every rank writes one (dense state on rank 0 only,
        expert state on the first rank of each expert-data-parallel group)."""
        return any(groups.ep_size > 1 for groups, _ in self.reducer.experts) if self.reducer else False

    def _exported_fragments(self, fragments):
        if not self.saves_per_rank:
            return fragments
        from deepscale import comm as dist
        names = checkpoint_param_names(self._module)
        writer = {}
        for param in self.reducer.params:
            groups = expert_groups_of_param(param)
            writer[names.get(param)] = groups.edp_rank == 0 if groups else dist.get_rank(self.group) == 0
        return [f for f in fragments if writer.get(f.name, False)]

    def _named_masters(self):
        names = checkpoint_param_names(self._module)  # experts under global names
        group_of, named, group_names = {}, [], []
        for index, group in enumerate(self.precision.optimizer.param_groups):
            group_names.append([])
            for model_param, master in zip(self._group_model_params(index), group["params"]):
                group_of[id(master)] = index
                if model_param in names and model_param.requires_grad:
                    named.append((names[model_param], master))
                    group_names[-1].append(names[model_param])
        return named, group_of, group_names

    def _group_model_params(self, index: int):
        masters = self.precision.optimizer.param_groups[index]["params"]
        by_master = {id(m): p for p, m in zip(self.precision.model_params, self.precision.master_params)}
        return [by_master.get(id(m), m) for m in masters]

    def owned_fragments(self):
        """Whole parameters: stage 0 holds every fragment."""
        named, group_of, _ = self._named_masters()
        return fragments_of_whole_params(named, group_of)

    def state_dict(self):
        """The portable shard of the (replicated) optimizer state, or None without an optimizer."""
        if self.precision is None:
            return None
        named, group_of, group_names = self._named_masters()
        return export_shard(self.precision.optimizer,
                            self._exported_fragments(fragments_of_whole_params(named, group_of)), group_names,
                            self.precision.loss_scaler, zero_stage=0)

    def load_state_dict(self, state: dict, load_optimizer_states: bool = True) -> None:
        self.load_shards([state], load_optimizer_states=load_optimizer_states)

    def load_shards(self, shards, load_optimizer_states: bool = True) -> None:
        """Fill masters and optimizer state from every shard of a checkpoint (any stage/world size)."""
        if self.precision is None:
            return
        import_shards(shards, self.precision.optimizer, self.owned_fragments(), self.precision.loss_scaler,
                      load_optimizer_states)
        self.precision.copy_masters_to_model()

    @torch.no_grad()
    def reseed_masters(self, module: torch.nn.Module, module_state: dict) -> None:
        """Set fp32 masters from saved weights (full precision when they were saved in fp32)."""
        if self.precision is None or not self.precision.uses_master_copies:
            return
        for name, param in module.named_parameters():
            if self.precision.has_param(param) and name in module_state:
                self.precision.master_of(param).copy_(module_state[name].float())

    def destroy(self) -> None:
        if self.reducer is not None:
            self.reducer.remove_hooks()
            self.reducer.release()
            for param in self.reducer.params:
                if param.grad is not None and param.grad is self.reducer.grad_view(param):
                    param.grad = None  # a view into the released buffer
                if hasattr(param, "_deepscale_full_access"):
                    del param._deepscale_full_access
