"""The pipeline engine: what ``deepscale.initialize`` returns for a :class:`PipelineModule`.

It is the ordinary :class:`~deepscale.runtime.engine.Engine` (precision, ZeRO stage, lr schedule,
monitors) over this rank's stage, with its data-parallel group set to the stage's replicas,
plus ``train_batch``/``eval_batch``, which run a schedule (``schedules.py``) through the
executor (``executor.py``). This class only supplies the pieces the executor asks for (data,
loss scaling, gradient reduction, tied weights, the step) and the cross-stage reductions: the
loss every rank returns, the global gradient norm (tied weights counted once), and with it the
fp16 overflow decision, which is therefore the same on every stage.
"""
import functools
from typing import List, Optional

import torch

from deepscale import comm as dist
from deepscale.utils.repeating_loader import RepeatingLoader
from deepscale.runtime.engine import Engine
from deepscale.runtime.engine_setup import cast_floating_inputs
from deepscale.runtime.pipe import checkpoint as pipe_checkpoint
from deepscale.runtime.pipe.executor import StageExecutor, StageHooks
from deepscale.runtime.pipe.grid import PipelineGrid
from deepscale.runtime.pipe.module import PipelineModule, owner_of
from deepscale.runtime.pipe.p2p import PipeChannel, flatten, unflatten
from deepscale.runtime.pipe.schedules import check_schedule_layout, eval_schedule, train_schedule
from deepscale.runtime.pipe.tp_compose import check_mpu_layout


class PipelineError(RuntimeError):
    """A pipeline engine was used like a plain engine (``forward``/``backward``/``step``)."""


_USE_TRAIN_BATCH = ("engine.{name}() is not available with pipeline parallelism: the schedule runs forward, backward "
                    "and the optimizer step together. Call engine.train_batch(data_iter) (or engine.eval_batch for "
                    "evaluation) instead")


class PipelineEngine(Engine):
    """Trains a :class:`PipelineModule` with a pipeline schedule; see :meth:`train_batch`.

    Built by :func:`deepscale.initialize` when ``model`` is a ``PipelineModule``; the arguments are
    those of :class:`Engine`. The config's ``pipeline.schedule`` picks the schedule and
    ``pipeline.stages`` (if not ``"auto"``) must equal the module's stage count.
    """

    def __init__(self, model: PipelineModule, config, optimizer=None, model_parameters=None, lr_scheduler=None,
                 training_data=None, collate_fn=None, mpu=None, dp_group=None):
        if not isinstance(model, PipelineModule):
            raise TypeError(f"PipelineEngine needs a PipelineModule, got {type(model).__name__}")
        if mpu is not None:  # a Megatron-style mpu: its layout must be the module's (3D, see tp_compose.py)
            check_mpu_layout(mpu, model.topology())
        stages = config.pipeline.stages
        if stages != "auto" and int(stages) != model.num_stages:
            raise ValueError(f"pipeline.stages={stages} but the PipelineModule has {model.num_stages} stages; set "
                             "pipeline.stages to 'auto' or to the module's num_stages")
        self.schedule_name = config.pipeline.schedule
        if model.num_stages > 1 or model.num_virtual_stages > 1:
            check_schedule_layout(self.schedule_name, model.num_virtual_stages, model.virtual_placement)
        self.grid = PipelineGrid(model.topology(), model.tied_stages, mpu=mpu)
        super().__init__(model, config, optimizer=optimizer, model_parameters=model_parameters,
                         lr_scheduler=lr_scheduler, training_data=training_data, collate_fn=collate_fn, mpu=self.grid)
        self.stage_id, self.num_stages = self.grid.stage_id, self.grid.pipe_parallel_size
        self.micro_batches = self.gradient_accumulation_steps()
        self._sync_tied_weights()
        self._train_opt.reduce_norm_squares = self._reduce_norm_squares
        self._tied_duplicate_squares = None
        self.channel = PipeChannel(self.stage_id, self.grid.stage_to_global, self.device,
                                   model.num_virtual_stages)
        self._executor = StageExecutor(self.stage_id, self.channel, _EngineHooks(self))
        self._last_stage_has_loss = self._agree_on_loss_fn()
        self.data_iterator = None
        self.batch_fn = None
        self._schedules = {}
        self.agg_train_loss = None

    def _set_topology(self, mpu, dp_group) -> None:
        super()._set_topology(mpu, dp_group)
        if self.grid.topology.parallel is not None:
            self.topology = self.grid.topology.parallel  # pp x dp (x tp): the one rank grid

    # --- what DeepSpeed's pipeline engine exposes -----------------------------------------
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def _needs_data(self) -> bool:
        # Stage 0 holds the first chunk; the last chunk is on the last stage, or on stage 0 for ZB-V.
        return self.is_first_stage() or self._holds_last_chunk()

    def set_dataiterator(self, iterator) -> None:
        """Set the iterator ``train_batch`` reads (first and last stages; others ignore it)."""
        self.data_iterator = iterator

    def set_batch_fn(self, fn) -> None:
        """Apply ``fn`` to every batch read from the data iterator."""
        self.batch_fn = fn

    def reset_activation_shape(self) -> None:
        """Kept for DeepSpeed scripts: shapes are re-negotiated automatically when they change."""

    def _make_schedule(self, train: bool, num_micro_batches: int):
        key = (train, num_micro_batches)
        if key not in self._schedules:
            v, placement = self.module.num_virtual_stages, self.module.virtual_placement
            self._schedules[key] = (train_schedule(self.schedule_name, self.num_stages, num_micro_batches, v, placement)
                                    if train else eval_schedule(self.num_stages, num_micro_batches, v, placement))
        return self._schedules[key]

    # --- training -------------------------------------------------------------------------
    def train_batch(self, data_iter=None) -> torch.Tensor:
        """Run one optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Args:
            data_iter: an iterator of ``(inputs, labels)`` micro-batches; needed on the first and
                last stages (others may pass None). Default: the iterator of
                :meth:`set_dataiterator`, or one over the engine's training data.

        Returns:
            the mean loss of the micro-batches (averaged over data-parallel replicas), on every rank.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() was called under torch.no_grad(); use eval_batch() for evaluation")
        if not self._last_stage_has_loss:
            raise ValueError("the last pipeline stage has no loss: pass PipelineModule(loss_fn=...) so that "
                             "train_batch can compute a loss from the last layer's outputs and the labels (a "
                             "model whose last layer returns the loss can pass loss_fn=lambda loss, labels: loss)")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self._ensure_data_iterator()
        self.module.train()
        self.micro_batches = self.gradient_accumulation_steps()
        self._reporter.start("step")
        result = self._executor.run(self._make_schedule(True, self.micro_batches))
        self._reporter.stop("step")
        self.agg_train_loss = self._aggregate_loss(result["losses"], average=True)
        self._reporter.record_loss(self.agg_train_loss)
        self._reporter.after_step()
        return self.agg_train_loss

    def eval_batch(self, data_iter, return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: Optional[str] = "avg", bcast_loss: bool = True, num_micro_batches=None):
        """Forward ``num_micro_batches`` (default: gradient_accumulation_steps) micro-batches.

        Args:
            data_iter: the iterator of ``(inputs, labels)`` micro-batches (first and last stages).
            return_logits: also return the last layer's outputs (last stage; None elsewhere).
            compute_loss: compute the loss with the module's ``loss_fn``. Default True.
            reduce_output: ``"avg"`` averages the micro-batch losses; None returns their list.
            bcast_loss: give every stage the loss (else only the last stage has it). Default True.

        Returns:
            the loss (or list of losses), and ``(loss, outputs)`` with ``return_logits``.
        """
        if reduce_output not in ("avg", None):
            raise ValueError(f"eval_batch: reduce_output={reduce_output!r}; allowed: 'avg', None")
        num_micro_batches = num_micro_batches or self.gradient_accumulation_steps()
        previous = self.data_iterator
        self.set_dataiterator(data_iter)
        self._ensure_data_iterator()
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                result = self._executor.run(self._make_schedule(False, num_micro_batches),
                                            return_outputs=return_logits, compute_loss=compute_loss)
        finally:
            self.module.train(was_training)
            self.data_iterator = previous
        loss = None
        if compute_loss:
            if reduce_output == "avg":
                loss = self._aggregate_loss(result["losses"], average=True, broadcast=bcast_loss)
            else:
                loss = [self._aggregate_loss([x], average=True, broadcast=bcast_loss)
                        for x in self._padded_losses(result["losses"], num_micro_batches)]
        if return_logits:
            return loss, (result["outputs"] if self._holds_last_chunk() else None)
        return loss

    def _agree_on_loss_fn(self) -> bool:
        """Whether the stage computing the loss has a ``loss_fn`` (so every stage raises together)."""
        flag = torch.tensor([float(self.module.loss_fn is not None)], device=self.device)
        if self.num_stages > 1:
            dist.broadcast(flag, src=self.grid.stage_to_global(self._last_chunk_stage()), group=self.grid.pp_group)
        return bool(flag.item())

    def _holds_last_chunk(self) -> bool:
        return self._last_chunk_stage() == self.stage_id

    def _padded_losses(self, losses, count: int):
        return losses if self._holds_last_chunk() else [None] * count

    def _ensure_data_iterator(self) -> None:
        if self.data_iterator is None and self._needs_data():
            if self.training_dataloader is None:
                raise ValueError("train_batch/eval_batch: the first and last pipeline stages need data; pass "
                                 "data_iter=, call engine.set_dataiterator(), or give training_data to initialize()")
            self.data_iterator = iter(RepeatingLoader(self.training_dataloader))

    def _aggregate_loss(self, losses: List[torch.Tensor], average: bool, broadcast: bool = True) -> torch.Tensor:
        """The mean of this batch's losses, sent from the last stage to all and averaged over replicas."""
        holder = self.grid.stage_to_global(self._last_chunk_stage())
        if losses and losses[0] is not None:
            value = torch.stack([x.float().reshape(()) for x in losses]).mean()
        else:
            value = torch.zeros((), dtype=torch.float32)
        value = value.to(self.device)
        if broadcast and self.num_stages > 1:
            dist.broadcast(value, src=holder, group=self.grid.pp_group)
        if self.dp_world_size > 1:
            dist.all_reduce(value, group=self.dp_group)
            value /= self.dp_world_size
        return value

    def _last_chunk_stage(self) -> int:
        return owner_of(self.num_stages * self.module.num_virtual_stages - 1, self.num_stages,
                        self.module.virtual_placement)[0]

    # --- tied weights and the global norm -------------------------------------------------
    @torch.no_grad()
    def _sync_tied_weights(self) -> None:
        """Give every stage holding a tied module the weights of its first stage."""
        for key in sorted(self.grid.tied_groups):
            group = self.grid.tied_groups[key]
            if group is None:
                continue
            for param in self.module.tied_parameters(key):
                access = getattr(param, "_deepscale_full_access", None)
                value = access.get_full_fp32(param) if access is not None else param.data.float()
                dist.broadcast(value, src=self.grid.tied_ranks[key][0], group=group)
                if access is not None:
                    access.set_full_fp32(param, value)
                else:
                    param.data.copy_(value.to(param.dtype))

    @torch.no_grad()
    def reduce_tied_grads(self) -> None:
        """Sum the gradients of tied parameters over the stages that hold them."""
        duplicate = torch.zeros((), dtype=torch.float64, device=self.device)
        tp_size = self.grid.get_model_parallel_world_size()
        for key in sorted(self.grid.tied_groups):
            group = self.grid.tied_groups[key]
            if group is None:
                continue
            owner = self.grid.tied_ranks[key][0] == self.global_rank
            for param in self.module.tied_parameters(key):
                access = getattr(param, "_deepscale_full_access", None)
                if access is None:
                    raise RuntimeError("tied pipeline weights need an optimizer managed by the engine")
                grad = access.get_full_grad(param)
                dist.all_reduce(grad, group=group)
                access.set_full_grad(param, grad)
                if not owner:
                    # Counted like the global norm counts it: a tensor-parallel shard once per shard,
                    # a replicated weight once over the tensor-parallel group (summed below).
                    share = 1.0 if getattr(param, "tensor_model_parallel", False) else 1.0 / tp_size
                    duplicate += grad.double().pow(2).sum() * share
        if tp_size > 1:
            dist.all_reduce(duplicate, group=self.grid.tp_group)
        self._tied_duplicate_squares = duplicate

    def _reduce_norm_squares(self, squares: torch.Tensor) -> torch.Tensor:
        """Data-parallel squares of this stage -> the whole model's (tied weights once)."""
        if self._tied_duplicate_squares is not None:
            # A rank holding a partition of the gradients counts its tied duplicates once per replica
            # group: the data-parallel sum already happened, so subtract the whole duplicate once.
            squares = squares - self._tied_duplicate_squares.to(device=squares.device, dtype=squares.dtype)
        if self.num_stages > 1:
            squares = squares.clone()
            dist.all_reduce(squares, group=self.grid.pp_group)
        return squares

    def optimizer_step(self) -> None:
        """The boundary part of :meth:`Engine.step` (called by the schedule's last instruction)."""
        applied = self._step_applied = self._train_opt.step()
        self._tied_duplicate_squares = None
        if applied:
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        else:
            self.skipped_steps += 1
        self.zero_grad()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self.micro_steps += self.micro_batches
        dist.set_training_step(self.global_steps)

    # --- a plain engine's training calls are refused ---------------------------------------
    def forward(self, *args, **kwargs):
        raise PipelineError(_USE_TRAIN_BATCH.format(name="forward"))

    def backward(self, *args, **kwargs):
        raise PipelineError(_USE_TRAIN_BATCH.format(name="backward"))

    def step(self, *args, **kwargs):
        raise PipelineError(_USE_TRAIN_BATCH.format(name="step"))

    # --- checkpoints (one file per layer; see checkpoint.py) --------------------------------
    def save_checkpoint(self, save_dir: str, tag=None, client_state=None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> bool:
        """Save one file per layer plus the optimizer shards; loads at any pipeline degree."""
        return pipe_checkpoint.save(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag=None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn=None):
        """Load a checkpoint saved at any pipeline degree (or by a plain engine over the same layers)."""
        if custom_load_fn is not None:
            raise ValueError("load_checkpoint: custom_load_fn is not supported by deepscale")
        return pipe_checkpoint.load(self, load_dir, tag, load_module_strict, load_optimizer_states,
                                    load_lr_scheduler_states, load_module_only)


class _EngineHooks(StageHooks):
    """The engine side of the executor."""

    def __init__(self, engine: PipelineEngine):
        self.engine = engine

    def load_micro_batch(self, micro_batch: int):
        engine = self.engine
        if engine.data_iterator is None:
            raise ValueError(f"pipeline stage {engine.stage_id} needs data but has no data iterator")
        batch = next(engine.data_iterator)
        if engine.batch_fn is not None:
            batch = engine.batch_fn(batch)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("pipeline data iterators must yield (inputs, labels) pairs; got "
                            f"{type(batch).__name__}")
        inputs, labels = _to_device(batch[0], engine.device), _to_device(batch[1], engine.device)
        if engine.model_dtype != torch.float32:
            inputs = cast_floating_inputs(inputs, engine.model_dtype)
        return inputs, labels

    def run_forward(self, inputs, chunk: int):
        engine = self.engine
        forward_context = getattr(engine._train_opt, "forward_context", None)
        if forward_context is None:
            return engine.module(inputs, chunk=chunk)
        with forward_context():
            return engine.module(inputs, chunk=chunk)

    def compute_loss(self, outputs, labels):
        loss_fn = self.engine.module.loss_fn
        if loss_fn is None:  # eval_batch(compute_loss=True) without one: the last layer computed the loss
            if torch.is_tensor(outputs) and outputs.numel() == 1:
                return outputs
            raise ValueError("eval_batch(compute_loss=True) needs PipelineModule(loss_fn=...) or a last layer that "
                             "returns a scalar loss; pass compute_loss=False to get only the outputs")
        return loss_fn(outputs, labels)

    def loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise TypeError(f"PipelineModule loss_fn must return a scalar tensor, got {type(loss).__name__}")
        return loss.float() * (engine.loss_scale / engine.micro_batches)

    def begin_backward(self, sync: bool) -> None:
        self.engine._train_opt.prepare_backward(sync)

    def end_backward(self, sync: bool) -> None:
        self.engine._train_opt.finish_backward(sync)

    def reduce_tied_grads(self) -> None:
        self.engine.reduce_tied_grads()

    def optimizer_step(self) -> None:
        self.engine.optimizer_step()

    def chunk_parameters(self, chunk: int):
        module = self.engine.module
        seen, params = set(), []
        for _, func in module._chunks[chunk]:
            owner = func.args[0] if isinstance(func, functools.partial) else func  # a tied layer's forward_fn
            if isinstance(owner, torch.nn.Module):
                for p in owner.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        return params


def _to_device(obj, device):
    meta, tensors = flatten(obj)
    return unflatten(meta, [t.to(device) for t in tensors])
