"""Runs one pipeline stage's instruction list (see ``schedules.py``); the only part that computes.

The executor owns the per-micro-batch buffers (inputs, outputs, received gradients) and turns
each instruction into forward/backward calls on the stage's module and sends/receives on its
:class:`~deepscale.runtime.pipe.p2p.PipeChannel`. Everything that belongs to the engine (data,
loss scaling, gradient reduction, the optimizer step) comes through a :class:`StageHooks`.

Note: how gradients reach the optimizer. A whole backward (``B``) runs inside the training
optimizer's ``prepare_backward(sync=False)``/``finish_backward(sync=False)``, so its hooks
accumulate each gradient as they do for ``engine.backward`` (fp32 accumulation for bf16/fp16
models, ZeRO-2 partitions). A split backward computes the input half (``I``) with
``torch.autograd.grad`` and the weight half (``W``) from the intermediate gradients ``I``
saved (``torch.distributed.pipelining``'s split, so no work is repeated); ``W`` writes
``param.grad`` directly and an empty ``prepare_backward/finish_backward`` pair right after folds
it into the optimizer's buffers. ``REDUCE_GRADS`` is one more empty pair with ``sync=True``: the
data-parallel reduction of the whole batch, as DeepSpeed's pipeline engine does it after the
schedule.
"""
import time
from typing import Any, Dict, List, Tuple

import torch

from deepscale.runtime.pipe.p2p import PipeChannel, flatten, unflatten
from deepscale.runtime.pipe.schedules import Instruction, Op, Schedule

try:  # the split backward of torch.distributed.pipelining (no repeated work between I and W)
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
except ImportError:  # pragma: no cover - older torch: W repeats the activation-gradient chain
    stage_backward_input = stage_backward_weight = None


class StageHooks:
    """What the executor asks of the engine (the pipeline engine implements these)."""

    def load_micro_batch(self, micro_batch: int) -> Tuple[Any, Any]:
        """``(inputs, labels)`` of the next micro-batch (first and last stages only)."""
        raise NotImplementedError

    def run_forward(self, inputs, chunk: int):
        raise NotImplementedError

    def compute_loss(self, outputs, labels):
        raise NotImplementedError

    def loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss scaled for backward (loss scale / accumulation steps)."""
        raise NotImplementedError

    def begin_backward(self, sync: bool) -> None:
        raise NotImplementedError

    def end_backward(self, sync: bool) -> None:
        raise NotImplementedError

    def reduce_tied_grads(self) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        raise NotImplementedError

    def chunk_parameters(self, chunk: int) -> List[torch.nn.Parameter]:
        raise NotImplementedError


def _grad_tensors(obj) -> List[torch.Tensor]:
    """The tensors of ``obj`` that carry gradients across a stage boundary, in wire order."""
    return [t for t in flatten(obj)[1] if t.requires_grad and t.is_floating_point()]


class StageExecutor:
    """Executes ``schedule.stages[stage]`` for one batch.

    Args:
        stage: this rank's pipeline stage.
        channel: the rank's :class:`PipeChannel`.
        hooks: the engine side (:class:`StageHooks`).
    """

    #: Keep ``(instruction, start, end)`` of the last run in ``trace`` (perf_counter seconds).
    record_trace = False

    def __init__(self, stage: int, channel: PipeChannel, hooks: StageHooks):
        self.stage, self.channel, self.hooks = stage, channel, hooks
        self.trace = []

    def run(self, schedule: Schedule, return_outputs: bool = False, compute_loss: bool = True) -> Dict[str, Any]:
        """Run this stage's program; returns ``{"losses": [...], "outputs": [...]}`` (last stage)."""
        self._schedule = schedule
        self._num_vs = schedule.num_stages * schedule.num_virtual_stages
        self._train, self._return_outputs, self._compute_loss = schedule.train, return_outputs, compute_loss
        self._batches: Dict[int, Tuple[Any, Any]] = {}
        self._inputs: Dict[Tuple[int, int], Any] = {}
        self._outputs: Dict[Tuple[int, int], Any] = {}
        self._out_grads: Dict[Tuple[int, int], Any] = {}
        self._in_grads: Dict[Tuple[int, int], Any] = {}
        self._split_state: Dict[Tuple[int, int], Any] = {}
        self.losses: List[torch.Tensor] = []
        self.outputs: List[Any] = []
        handlers = {Op.LOAD: self._load, Op.FORWARD: self._forward, Op.BACKWARD: self._backward,
                    Op.BACKWARD_INPUT: self._backward_input, Op.BACKWARD_WEIGHT: self._backward_weight,
                    Op.SEND_ACT: self._send_act, Op.RECV_ACT: self._recv_act, Op.SEND_GRAD: self._send_grad,
                    Op.RECV_GRAD: self._recv_grad, Op.REDUCE_GRADS: self._reduce_grads,
                    Op.REDUCE_TIED: self._reduce_tied, Op.STEP: self._step}
        self.trace = []
        try:
            for ins in schedule.stages[self.stage]:
                if self.record_trace:
                    start = time.perf_counter()
                    handlers[ins.op](ins)
                    self.trace.append((ins, start, time.perf_counter()))
                else:
                    handlers[ins.op](ins)
        finally:
            self.channel.wait_sends()
        return {"losses": self.losses, "outputs": self.outputs}

    def _vs(self, ins: Instruction) -> int:
        return self._schedule.virtual_stage(self.stage, ins.chunk)

    # --- data and forward -------------------------------------------------------------------
    def _load(self, ins: Instruction) -> None:
        self._batches[ins.micro_batch] = self.hooks.load_micro_batch(ins.micro_batch)

    def _forward(self, ins: Instruction) -> None:
        key, vs = (ins.micro_batch, ins.chunk), self._vs(ins)
        if vs == 0:
            inputs = self._batches[ins.micro_batch][0]
            self._inputs[key] = inputs
        else:
            inputs = self._inputs[key]
        with torch.set_grad_enabled(self._train):
            outputs = self.hooks.run_forward(inputs, ins.chunk)
            if vs == self._num_vs - 1:
                labels = self._batches.pop(ins.micro_batch)[1]
                if self._return_outputs:
                    self.outputs.append(_detached(outputs))
                if self._train or self._compute_loss:
                    loss = self.hooks.compute_loss(outputs, labels)
                    self.losses.append(loss.detach())
                    outputs = loss
        if self._train:
            self._outputs[key] = outputs
        else:
            self._inputs.pop(key, None)
            if vs != self._num_vs - 1:
                self._outputs[key] = outputs

    def _send_act(self, ins: Instruction) -> None:
        key = (ins.micro_batch, ins.chunk)
        outputs = self._outputs[key] if self._train else self._outputs.pop(key)
        self.channel.send(outputs, ins.peer, "act", ins.micro_batch, self._vs(ins) + 1)

    def _recv_act(self, ins: Instruction) -> None:
        self._inputs[(ins.micro_batch, ins.chunk)] = self.channel.recv(ins.peer, "act", ins.micro_batch, self._vs(ins))

    # --- backward ---------------------------------------------------------------------------
    def _backward_roots(self, key, vs: int):
        """(tensors, grad_tensors) that start this micro-batch's backward on this chunk."""
        outputs = self._outputs.pop(key)
        if vs == self._num_vs - 1:
            return [self.hooks.loss_for_backward(outputs)], None
        tensors = _grad_tensors(outputs)
        grads = list(self._out_grads.pop(key))
        if len(grads) != len(tensors):
            raise RuntimeError(f"pipeline stage {self.stage}: {len(tensors)} outputs need gradients but "
                               f"{len(grads)} gradients came back; did a later stage change which tensors "
                               "require grad?")
        return tensors, grads

    def _backward(self, ins: Instruction) -> None:
        key, vs = (ins.micro_batch, ins.chunk), self._vs(ins)
        tensors, grads = self._backward_roots(key, vs)
        inputs = _grad_tensors(self._inputs.pop(key)) if vs > 0 else []
        self.hooks.begin_backward(False)
        torch.autograd.backward(tensors, grad_tensors=grads)
        self.hooks.end_backward(False)
        if vs > 0:
            self._in_grads[key] = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs)

    def _backward_input(self, ins: Instruction) -> None:
        key, vs = (ins.micro_batch, ins.chunk), self._vs(ins)
        tensors, grads = self._backward_roots(key, vs)
        inputs = _grad_tensors(self._inputs.pop(key)) if vs > 0 else []
        if not inputs or stage_backward_input is None:
            # Nothing to send upstream (the first chunk), or no split available: W does it all.
            if inputs:
                dinputs = torch.autograd.grad(tensors, inputs, grad_outputs=grads, retain_graph=True,
                                              allow_unused=True)
                self._in_grads[key] = tuple(g if g is not None else torch.zeros_like(t)
                                            for g, t in zip(dinputs, inputs))
            self._split_state[key] = ("whole", tensors, grads)
            return
        params = self.hooks.chunk_parameters(ins.chunk)
        dinputs, param_groups = stage_backward_input(tensors, grads, inputs, iter(params))
        self._in_grads[key] = tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(dinputs, inputs))
        self._split_state[key] = ("split", params, param_groups)

    def _backward_weight(self, ins: Instruction) -> None:
        key = (ins.micro_batch, ins.chunk)
        state = self._split_state.pop(key)
        if state[0] == "whole":
            _, tensors, grads = state
            self.hooks.begin_backward(False)
            params = [p for p in self.hooks.chunk_parameters(ins.chunk) if p.requires_grad]
            torch.autograd.backward(tensors, grad_tensors=grads, inputs=params or None)
            self.hooks.end_backward(False)
            return
        _, params, param_groups = state
        stage_backward_weight(iter(params), param_groups)
        # The split wrote param.grad directly; fold it into the optimizer's buffers now.
        self.hooks.begin_backward(False)
        self.hooks.end_backward(False)

    def _send_grad(self, ins: Instruction) -> None:
        grads = self._in_grads.pop((ins.micro_batch, ins.chunk))
        self.channel.send(grads, ins.peer, "grad", ins.micro_batch, self._vs(ins) - 1)

    def _recv_grad(self, ins: Instruction) -> None:
        self._out_grads[(ins.micro_batch, ins.chunk)] = self.channel.recv(ins.peer, "grad", ins.micro_batch,
                                                                          self._vs(ins))

    # --- end of batch -----------------------------------------------------------------------
    def _reduce_grads(self, ins: Instruction) -> None:
        self.channel.wait_sends()
        self.hooks.begin_backward(True)
        self.hooks.end_backward(True)

    def _reduce_tied(self, ins: Instruction) -> None:
        self.hooks.reduce_tied_grads()

    def _step(self, ins: Instruction) -> None:
        self.hooks.optimizer_step()


def _detached(obj):
    meta, tensors = flatten(obj)
    return unflatten(meta, [t.detach() for t in tensors])
