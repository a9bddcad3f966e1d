"""Stage-0 training optimizer: replicated states, bucketed gradient all-reduce.

Note: the training-optimizer interface. The engine talks to one object for everything that
touches gradients and optimizer state, so each ZeRO stage can bring its own:
  ``prepare_backward(sync)``   before ``loss.backward()``; ``sync``: this backward ends an
                               accumulation window and gradients must be averaged
  ``finish_backward(sync)``    after it; on sync, averaged gradients are ready afterwards
  ``step() -> bool``           unscale/clip/overflow check/update; False if skipped
  ``zero_grad()``, ``loss_scale``, ``last_grad_norm``, ``param_groups``,
  ``user_optimizer`` (what initialize returns), ``basic_optimizer`` (the torch optimizer),
  ``has_pending_grads``, ``state_dict()``/``load_state_dict()``,
  ``reseed_masters(module, module_state_dict)``, ``destroy()``.
"""
import torch

from deepscale.runtime.grad_reducer import GradientReducer
from deepscale.runtime.precision.precision_optimizer import PrecisionOptimizer


class DataParallelOptimizer:
    """ZeRO stage 0: every rank holds all states; gradients are all-reduced in buckets.

    Args:
        module: the model (already on its device, still fp32 when masters are needed).
        basic_optimizer: the torch optimizer over the model parameters, or None.
        model_dtype: dtype the model will be cast to.
        loss_scaler: loss scaler for fp16, else None.
        clip_grad: global-norm clipping threshold; 0 disables.
        check_overflow: skip steps with inf/nan gradients.
        group, world_size: the data-parallel group.
        bucket_numel, accum_dtype, comm_dtype, predivide_factor: see :class:`GradientReducer`.
    """

    def __init__(self, module: torch.nn.Module, basic_optimizer, model_dtype: torch.dtype, loss_scaler,
                 clip_grad: float, check_overflow: bool, group, world_size: int, bucket_numel: int,
                 accum_dtype: torch.dtype, comm_dtype: torch.dtype, predivide_factor: float = 1.0):
        self.precision = None
        if basic_optimizer is not None:
            self.precision = PrecisionOptimizer(basic_optimizer, model_dtype=model_dtype, loss_scaler=loss_scaler,
                                                clip_grad=clip_grad, check_overflow=check_overflow)
        self._module = module
        self._pending_cast = model_dtype if model_dtype != torch.float32 else None
        self.reducer = None
        self._reducer_args = dict(group=group, world_size=world_size, bucket_numel=bucket_numel,
                                  accum_dtype=accum_dtype, comm_dtype=comm_dtype, predivide_factor=predivide_factor)

    def attach(self) -> None:
        """Install the gradient hooks; call once the model has its final dtype and device."""
        params = [p for p in self._module.parameters() if p.requires_grad]
        self.reducer = GradientReducer(params, **self._reducer_args)

    # --- backward -------------------------------------------------------------------------
    def prepare_backward(self, sync: bool) -> None:
        self.reducer.sync_enabled = sync
        # A param.grad left pointing into the flat buffer would make autograd accumulate into
        # the buffer in place, and the hook would then count it twice.
        for param in self.reducer.params:
            param.grad = None

    def finish_backward(self, sync: bool) -> None:
        if not sync:
            self.reducer.end_micro_step()
            return
        self.reducer.finalize()
        for param in self.reducer.params:
            view = self.reducer.grad_view(param)
            if self.precision is not None and self.precision.has_param(param):
                self.precision.set_master_grad(param, view)
            elif view.dtype == param.dtype:
                param.grad = view

    @property
    def has_pending_grads(self) -> bool:
        return self.reducer.has_pending_grads

    # --- step -----------------------------------------------------------------------------
    def step(self) -> bool:
        if self.precision is None:
            raise RuntimeError("engine.step(): no optimizer was configured; pass optimizer= to initialize() or "
                               "add an 'optimizer' section to the config")
        # The flat buffer holds every gradient: its norm is one reduction.
        norm = torch.linalg.vector_norm(self.reducer.buffer, 2.0, dtype=torch.float32)
        return self.precision.step(grad_norm=norm)

    def zero_grad(self) -> None:
        self.reducer.zero()
        if self.precision is not None:
            self.precision.zero_grad()
        for param in self.reducer.params:
            param.grad = None

    # --- what the engine reports ----------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.precision.loss_scale if self.precision is not None else 1.0

    @property
    def last_grad_norm(self):
        return self.precision.last_grad_norm if self.precision is not None else None

    @property
    def param_groups(self):
        return self.precision.param_groups if self.precision is not None else []

    @property
    def basic_optimizer(self):
        return self.precision.optimizer if self.precision is not None else None

    @property
    def user_optimizer(self):
        """The precision wrapper with fp16/bf16 masters, else the torch optimizer itself."""
        if self.precision is None:
            return None
        return self.precision if self.precision.uses_master_copies else self.precision.optimizer

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self):
        return self.precision.state_dict() if self.precision is not None else None

    def load_state_dict(self, state: dict, load_optimizer_states: bool = True) -> None:
        if self.precision is not None:
            self.precision.load_state_dict(state, load_optimizer_states=load_optimizer_states)

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
            self.reducer.buffer = torch.empty(0)
