"""The Engine: the object ``deepscale.initialize`` returns.

The engine holds no algorithm of its own (DESIGN.md): it reads the config and wires together
the gradient reducer (data-parallel averaging), the precision optimizer (master weights, loss
scaling, clipping), the lr schedule, the data loader, checkpoints and step reporting.
"""
import contextlib
import os
from typing import Optional

import torch

from deepscale import comm as dist
from deepscale.accelerator import get_accelerator
from deepscale.comm.topology import ParallelTopology
from deepscale.profiling.flops_profiler.engine_profile import EngineFlopsProfile
from deepscale.runtime.activation_checkpointing import configure as configure_checkpointing
from deepscale.runtime.checkpoint.engine_checkpoint import (EngineState, load_engine_checkpoint, resolve_checkpoint,
                                                            save_engine_checkpoint)
from deepscale.runtime.checkpoint.expert_files import consolidate_expert_weights
from deepscale.runtime.checkpoint.tag_validation import validate_checkpoint_tag
from deepscale.runtime.dataloader import DeepScaleDataLoader
from deepscale.runtime.engine_compat import EngineCompatMixin
from deepscale.runtime.engine_setup import (broadcast_module_from_rank0, build_lr_scheduler_for, build_optimizer_for,
                                            build_loss_scaler_for, cast_floating_inputs, configure_collective_watchdog,
                                            reducer_dtypes, setup_expert_parallelism, stage0_bucket_numel)
from deepscale.runtime.dp_optimizer import DataParallelOptimizer
from deepscale.parallel.state_dict import full_state_dict
from deepscale.runtime.model_parallel_setup import tensor_parallel_norm
from deepscale.runtime.step_reporter import StepReporter
from deepscale.runtime.zero.stage_1_and_2 import ZeroOptimizer, zero_optimizer_kwargs
from deepscale.runtime.zero.stage3.optimizer import Stage3Optimizer, stage3_optimizer_kwargs
from deepscale.utils.logging import logger

_COUNTER_NAMES = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
# The engine-built loader's position travels in the client area under this reserved key.
_LOADER_STATE_KEY = "__deepscale_training_dataloader__"


class Engine(EngineCompatMixin, torch.nn.Module):
    """Trains a user's ``nn.Module`` with data parallelism and mixed precision.

    Built by :func:`deepscale.initialize`; see its docstring for the arguments. The wrapped
    model is ``engine.module``; ``engine(batch)`` calls it.
    """

    def __init__(self, model: torch.nn.Module, config, optimizer=None, model_parameters=None, lr_scheduler=None,
                 training_data=None, collate_fn=None, mpu=None, dp_group=None):
        super().__init__()
        self._config = config
        self._set_topology(mpu, dp_group)
        mpu = self.mpu
        if "activation_checkpointing" in (getattr(config, "raw", None) or {}):
            configure_checkpointing(mpu, deepspeed_config=config)  # as DeepSpeed: the section configures it
        configure_collective_watchdog(config)
        self.device = get_accelerator().device(self.local_rank if get_accelerator().device_name() != "cpu" else None)
        self.global_steps = self.global_samples = self.skipped_steps = self.micro_steps = 0
        self._in_no_sync = False
        self._no_sync_noted = False  # the stage 2/3 no_sync note is logged once
        self._boundary_override = None

        model_dtype = torch.float16 if config.fp16_enabled else torch.bfloat16 if config.bf16_enabled else torch.float32
        self.model_dtype = model_dtype
        self.module = model
        self.module.to(self.device)
        setup_expert_parallelism(self.module, self.dp_group, config)
        broadcast_module_from_rank0(self.module, self.grad_group, self.grad_world_size)
        # Masters are cloned before the model is cast, so they start from the fp32 weights.
        basic = build_optimizer_for(optimizer, config, model, model_parameters)
        accum_dtype, comm_dtype = reducer_dtypes(config, model_dtype)
        train_opt_args = dict(
            model_dtype=model_dtype, loss_scaler=build_loss_scaler_for(config), clip_grad=config.gradient_clipping,
            group=self.grad_group, world_size=self.grad_world_size,
            bucket_numel=stage0_bucket_numel(config) if config.zero_stage == 0
            else int(config.zero_optimization.reduce_bucket_size), accum_dtype=accum_dtype,
            comm_dtype=comm_dtype,
            predivide_factor=config.gradient_predivide_factor if config.prescale_gradients else 1.0)
        if config.zero_stage in (1, 2):
            self._train_opt = ZeroOptimizer(self.module, basic, stage=config.zero_stage, **train_opt_args,
                                            **zero_optimizer_kwargs(config))
        elif config.zero_stage == 3:
            self._train_opt = Stage3Optimizer(self.module, basic, **train_opt_args, **stage3_optimizer_kwargs(config))
        else:
            self._train_opt = DataParallelOptimizer(self.module, basic, **train_opt_args)
        if model_dtype != torch.float32:
            self.module.to(dtype=model_dtype)
        self._train_opt.attach()
        self._train_opt.tensor_parallel = tensor_parallel_norm(self.module, mpu)
        self.lr_scheduler = build_lr_scheduler_for(lr_scheduler, config, basic)
        self.training_dataloader = None
        if training_data is not None:
            self.training_dataloader = self.deepscale_io(training_data, collate_fn=collate_fn)
        self._reporter = StepReporter(config, self)
        self._flops = EngineFlopsProfile(self, config.flops_profiler) if config.flops_profiler.enabled else None
        self.flops_profiler = self._flops.profiler if self._flops is not None else None  # DeepSpeed's attribute
        logger.debug(f"engine ready: dp={self.dp_world_size} dtype={model_dtype} optimizer={basic}")

    def _set_topology(self, mpu, dp_group) -> None:
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = dist.get_local_rank()
        if mpu is not None:
            self.dp_group = mpu.get_data_parallel_group()
            self.dp_world_size = mpu.get_data_parallel_world_size()
            self.dp_rank = mpu.get_data_parallel_rank()
        else:
            self.dp_group = dp_group
            self.dp_world_size = dist.get_world_size(dp_group)
            self.dp_rank = dist.get_rank(dp_group)
        self.mpu = mpu
        self.topology = getattr(mpu, "topology", None) or ParallelTopology(dp=self.dp_world_size, world_size=None)
        # Gradients are averaged (and ZeRO partitions) over the ranks holding the same weights:
        # data-parallel ranks and, with Ulysses, their sequence-parallel peers (deepscale/parallel/grid.py).
        self.grad_group, self.grad_world_size = self.dp_group, self.dp_world_size
        sp_size = mpu.get_sequence_parallel_world_size() if hasattr(mpu, "get_sequence_parallel_world_size") else 1
        if sp_size > 1:
            self.grad_group = mpu.get_sequence_data_parallel_group()
            self.grad_world_size = self.dp_world_size * sp_size

    # --- configuration accessors (engine.config, the plain dict, is in engine_compat.py) ----
    def train_batch_size(self) -> int:
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self._config.gradient_accumulation_steps

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """Change the global batch size by changing gradient accumulation steps."""
        per_step = self.train_micro_batch_size_per_gpu() * self.dp_world_size
        if train_batch_size % per_step:
            raise ValueError(f"set_train_batch_size({train_batch_size}): must be a multiple of "
                             f"train_micro_batch_size_per_gpu * data-parallel size = {per_step}")
        self._config.gradient_accumulation_steps = train_batch_size // per_step
        self._config.train_batch_size = train_batch_size

    def fp16_enabled(self) -> bool:
        return bool(self._config.fp16_enabled)

    def bfloat16_enabled(self) -> bool:
        return bool(self._config.bf16_enabled)

    def zero_optimization_stage(self) -> int:
        return self._config.zero_stage

    def gradient_clipping(self) -> float:
        return self._config.gradient_clipping

    def steps_per_print(self) -> int:
        return self._config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return bool(self._config.wall_clock_breakdown)

    @property
    def optimizer(self):
        """What ``initialize`` returns as the optimizer: the precision wrapper with fp16/bf16,
        else the torch optimizer itself."""
        return self._train_opt.user_optimizer

    @property
    def basic_optimizer(self):
        return self._train_opt.basic_optimizer

    @property
    def loss_scale(self) -> float:
        return self._train_opt.loss_scale

    cur_scale = loss_scale

    def get_lr(self):
        """Current learning rate of each param group."""
        return [group["lr"] for group in self._train_opt.param_groups]

    def get_mom(self):
        """Current momentum (SGD) or beta1 (Adam family) of each param group."""
        return [g.get("betas", (g.get("momentum"),))[0] for g in self._train_opt.param_groups]

    @property
    def monitor(self):
        """The ``MonitorMaster`` of the config's monitor sections: ``engine.monitor.write_events([(tag, value,
        step), ...])`` writes user scalars (rank 0 only)."""
        return self._reporter.monitor

    def get_global_grad_norm(self) -> Optional[float]:
        """Global gradient norm of the last optimizer step (before clipping); None after an overflow."""
        return self._train_opt.last_grad_norm

    # --- data -----------------------------------------------------------------------------
    def deepscale_io(self, dataset, batch_size: Optional[int] = None, collate_fn=None, num_local_io_workers=0,
                     pin_memory: bool = False):
        """A loader over this rank's shard of ``dataset`` with the engine's micro-batch size."""
        return DeepScaleDataLoader(dataset, batch_size=batch_size or self.train_micro_batch_size_per_gpu(),
                                   dp_rank=self.dp_rank, dp_world_size=self.dp_world_size, collate_fn=collate_fn,
                                   drop_last=self._config.dataloader_drop_last, num_workers=num_local_io_workers,
                                   pin_memory=pin_memory)

    deepspeed_io = deepscale_io

    # --- training -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the wrapped module; floating inputs are cast to the model dtype under fp16/bf16."""
        self._reporter.start("forward", inputs=(args, kwargs))
        # A half/bf16 model cannot consume fp32 activations; integer inputs (token ids) are left alone.
        if self.model_dtype != torch.float32:
            args, kwargs = cast_floating_inputs((args, kwargs), self.model_dtype)
        # ZeRO-3 checks partitioned parameters used outside the modules that gather them.
        forward_context = getattr(self._train_opt, "forward_context", contextlib.nullcontext)
        with forward_context(), self._profiled("forward", (args, kwargs)):
            out = self.module(*args, **kwargs)
        self._reporter.stop("forward")
        return out

    def is_gradient_accumulation_boundary(self) -> bool:
        """True on the micro-step whose ``step()`` updates the weights."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Force the next boundary decision (pipeline schedules use this)."""
        self._boundary_override = is_boundary

    @contextlib.contextmanager
    def no_sync(self):
        """Skip the gradient all-reduce inside this block; gradients accumulate locally.

        At ZeRO stages 0 and 1 the rank keeps whole gradients, so the reduction is deferred to
        the first backward outside the block. At stages 2 and 3 a rank never holds the whole
        gradient, so gradients are still reduce-scattered into their partitions on every
        backward: the result is the same, only the communication is not saved (DeepSpeed
        refuses ``no_sync`` at these stages instead).
        """
        if self._config.zero_stage >= 2 and not self._no_sync_noted:
            self._no_sync_noted = True
            logger.info(f"engine.no_sync() at ZeRO stage {self._config.zero_stage}: gradients are partitioned, so they "
                        "are still reduce-scattered on every backward (same result, no communication saved)")
        previous = self._in_no_sync
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = previous

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True):
        """Backpropagate ``loss`` scaled by the loss scale and 1/gradient_accumulation_steps.

        On the accumulation boundary, the averaged gradients are ready when this returns.
        """
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise TypeError(f"engine.backward expects a scalar loss tensor, got "
                            f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}")
        if not loss.requires_grad:
            raise ValueError("engine.backward: the loss does not require grad; was it computed under no_grad() "
                             "or from frozen parameters only?")
        self._reporter.start("backward")
        self._reporter.record_loss(loss)
        sync = self.is_gradient_accumulation_boundary() and not self._in_no_sync
        with self._profiled("backward"):
            self._train_opt.prepare_backward(sync)
            scale = self.loss_scale / (self.gradient_accumulation_steps() if scale_wrt_gas else 1)
            try:
                (loss.float() * scale if scale != 1.0 else loss).backward(retain_graph=retain_graph)
            except BaseException:
                # disarm the gradient hooks: a later backward that is not the engine's (or a retry
                # after the user handled the error) must not be taken as this one's
                self._train_opt.abort_backward()
                raise
            self._train_opt.finish_backward(sync)
        self._reporter.stop("backward")
        return loss

    def step(self, lr_kwargs=None) -> None:
        """Update the weights at the accumulation boundary; otherwise only count the micro-step."""
        if self._in_no_sync:
            raise RuntimeError("engine.step() was called inside engine.no_sync(); leave the no_sync block for the "
                               "step that should apply the accumulated gradients")
        self._reporter.start("step")
        boundary = self.is_gradient_accumulation_boundary()
        self._step_applied = False
        if boundary:
            with self._profiled("step"):
                applied = self._step_applied = self._train_opt.step()
            if applied:
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step(**(lr_kwargs or {}))
            else:
                self.skipped_steps += 1
            self.zero_grad()
            self.global_steps += 1
            self.global_samples += self.train_batch_size()
            dist.set_training_step(self.global_steps)
        self.micro_steps += 1
        self._boundary_override = None
        self._reporter.stop("step")
        if boundary:
            self._reporter.after_step()
            if self._flops is not None:
                self._flops.after_step()

    def _profiled(self, phase: str, inputs=None):
        """The flops profiler's context for ``phase`` (counts and times it at ``profile_step``)."""
        return self._flops.phase(phase, inputs) if self._flops is not None else contextlib.nullcontext()

    def zero_grad(self) -> None:
        """Clear accumulated gradients (``step()`` does this after every update)."""
        self._train_opt.zero_grad()

    # --- checkpoints ----------------------------------------------------------------------
    def _engine_state(self, module_state=None) -> EngineState:
        tp = self.mpu.get_model_parallel_world_size() if hasattr(self.mpu, "get_model_parallel_world_size") else 1
        return EngineState(module=self.module, optimizer=self._train_opt, lr_scheduler=self.lr_scheduler,
                           counters={name: getattr(self, name) for name in _COUNTER_NAMES},
                           config=getattr(self._config, "raw", None), dp_world_size=self.grad_world_size,
                           zero_stage=self._config.zero_stage, dp_group=self.grad_group, module_state=module_state,
                           tp_size=tp, tp_rank=self.mpu.get_model_parallel_rank() if tp > 1 else 0)

    def save_checkpoint(self, save_dir: str, tag=None, client_state=None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> bool:
        """Save everything needed to resume into ``save_dir/tag`` (default tag ``global_step{N}``).

        The write is atomic: a crash leaves the previous checkpoint intact and ``latest``
        pointing at it. ``client_state`` (a dict) comes back from :meth:`load_checkpoint`.
        If any rank fails to write its files (a full disk, an exception), every rank raises
        ``CheckpointSaveError`` naming the failed ranks and nothing is published.
        ``exclude_frozen_parameters`` leaves parameters with ``requires_grad=False`` out of the
        saved module weights; loading such a checkpoint keeps the model's own frozen weights.
        """
        if client_state is not None and not isinstance(client_state, dict):
            raise TypeError(f"save_checkpoint: client_state must be a dict, got {type(client_state).__name__}")
        if self._train_opt.has_pending_grads:
            logger.warning("save_checkpoint inside a gradient accumulation window: gradients accumulated so far "
                           "are not saved")
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        validate_checkpoint_tag(tag, self._config.checkpoint.tag_validation)
        if self.training_dataloader is not None:
            client_state = {**(client_state or {}), _LOADER_STATE_KEY: self.training_dataloader.state_dict()}
        # ZeRO-3: every rank helps gather the module weights that rank 0 writes whole.
        with getattr(self._train_opt, "module_state_context", contextlib.nullcontext)():
            # Tensor-parallel shards are saved whole, so the checkpoint loads at any TP degree.
            whole = full_state_dict(self.module) if self._engine_state().tp_size > 1 else None
            save_engine_checkpoint(self._engine_state(whole), os.fspath(save_dir), tag, client_state, save_latest,
                                   exclude_frozen_parameters=exclude_frozen_parameters)
        return True

    def load_checkpoint(self, load_dir: str, tag=None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn=None):
        """Restore a checkpoint; returns ``(load_path, client_state)`` or ``(None, None)`` if none exists.

        Reads deepscale checkpoints and DeepSpeed's (ZeRO 0-3 and universal, see docs/checkpoints.md),
        saved at any world size and stage. The engine-built data loader resumes where it stopped.
        """
        if custom_load_fn is not None:
            raise ValueError("load_checkpoint: custom_load_fn is not supported by deepscale; load the module "
                             "state yourself from the returned path instead")
        path = resolve_checkpoint(os.fspath(load_dir), tag)
        if path is None:
            return None, None
        counters, client_state = load_engine_checkpoint(
            self._engine_state(), path, load_module_strict=load_module_strict,
            load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=load_lr_scheduler_states,
            load_module_only=load_module_only)
        for name in _COUNTER_NAMES:
            if name in counters:
                setattr(self, name, int(counters[name]))
        loader_state = client_state.pop(_LOADER_STATE_KEY, None) if isinstance(client_state, dict) else None
        if loader_state is not None and self.training_dataloader is not None and not load_module_only:
            self.training_dataloader.load_state_dict(loader_state)
        # Resume on an accumulation boundary even if gradient_accumulation_steps changed.
        self.micro_steps = self.global_steps * self.gradient_accumulation_steps()
        self.zero_grad()
        return path, client_state

    # --- ZeRO-3 module weights -------------------------------------------------------------
    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False):
        """The whole module state dict in the model dtype on rank 0 (None elsewhere); under ZeRO-3
        every rank must call it. At other stages rank 0 returns ``module.state_dict()`` (with MoE layers
        every rank must call it too: experts are collected under global names)."""
        if self._config.zero_stage == 3:
            state = self._train_opt.consolidated_state_dict(rank0_only=True)
        else:
            state = self.module.state_dict() if self.global_rank == 0 else None
        state = consolidate_expert_weights(self.module, state)  # MoE: every expert, global names
        if state is not None and exclude_frozen_parameters:
            frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        return state

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Save the whole module weights in the model dtype to ``save_dir/save_filename`` (rank 0 writes).

        Under ZeRO-3 this gathers the weights, so every rank must call it, and it needs
        ``zero_optimization.stage3_gather_16bit_weights_on_model_save: true``; otherwise nothing
        is saved and False is returned (use ``zero_to_fp32`` on a checkpoint instead).
        """
        if self._config.zero_stage == 3 and not self._config.zero_optimization.gather_16bit_weights_on_model_save:
            logger.warning("save_16bit_model: not saved, because zero_optimization."
                           "stage3_gather_16bit_weights_on_model_save is false; set it to true, or consolidate a "
                           "checkpoint with deepscale.utils.zero_to_fp32")
            return False
        state = self._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)
        if self.global_rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, save_filename)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
        return True

    def empty_partition_cache(self) -> None:
        """ZeRO-3: release every gathered parameter group (e.g. before evaluation with another model)."""
        if hasattr(self._train_opt, "empty_partition_cache"):
            self._train_opt.empty_partition_cache()

    def offload_states(self, include=None, device="cpu", pin_memory: bool = True, non_blocking: bool = False):
        """Move optimizer states and fp32 masters off the device (``runtime/offload/state_offload.py``)."""
        from deepscale.runtime.offload.state_offload import StateOffloader
        self._state_offloader = getattr(self, "_state_offloader", None) or StateOffloader()
        return self._state_offloader.offload(self._train_opt, include, device, pin_memory, non_blocking)

    def reload_states(self, non_blocking: bool = False) -> None:
        """Bring back what :meth:`offload_states` moved."""
        if getattr(self, "_state_offloader", None) is not None:
            self._state_offloader.reload(non_blocking)

    # --- teardown -------------------------------------------------------------------------
    def destroy(self) -> None:
        """Remove the engine's hooks from the model, free its buffers and close the monitors."""
        self._train_opt.destroy()
        self._reporter.close()
        if self._flops is not None:
            self._flops.close()


DeepSpeedEngine = Engine  # DeepSpeed's name: `deepspeed.runtime.engine.DeepSpeedEngine` type checks
