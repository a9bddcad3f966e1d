"""``FlopsProfiler``: parameters, FLOPs, MACs and latency of each module of a model.

DeepSpeed's class and method names (``deepspeed.profiling.flops_profiler.FlopsProfiler``); the
counting is done at the dispatcher (see the note in ``counting.py``), so it also measures the
backward pass and activation-checkpoint recomputation that actually ran.
"""
import time
from collections import defaultdict
from typing import Dict, Optional

import torch

from deepscale.accelerator import get_accelerator
from deepscale.profiling.flops_profiler import units
# DeepSpeed's profiler module also holds the string helpers; code imports them from there.
from deepscale.profiling.flops_profiler.units import (bytes_to_string, duration_to_string,  # noqa: F401
                                                      flops_to_string, macs_to_string, number_to_string,
                                                      params_to_string)
from deepscale.profiling.flops_profiler.counting import OpCounter, warm_up_dispatch
from deepscale.utils.logging import logger

FORWARD, BACKWARD, RECOMPUTE = "forward", "backward", "recompute"
PHASES = (FORWARD, BACKWARD, RECOMPUTE)
# DeepSpeed mirrors the profile on each module under these names; code reads them.
_MODULE_ATTRS = ("__flops__", "__macs__", "__params__", "__duration__")


def param_numel(param: torch.Tensor) -> int:
    """Elements of a parameter; under ZeRO-3 its whole (gathered) size, not the local shard."""
    return int(getattr(param, "ds_numel", param.numel()))


def module_params(module: torch.nn.Module) -> int:
    """Parameters of ``module`` and its children, each shared (tied) tensor once."""
    return sum(param_numel(p) for p in module.parameters())


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class FlopsProfiler:
    """Measures each module's parameters, forward FLOPs/MACs and forward latency, and the FLOPs of
    the whole backward pass and of activation-checkpoint recomputation.

    Usage (as DeepSpeed's)::

        prof = FlopsProfiler(model)
        prof.start_profile()
        loss = model(batch)
        loss.backward()              # optional: measured too (get_flops_by_phase)
        prof.print_model_profile(profile_step=step)
        flops = prof.get_total_flops()
        prof.end_profile()

    Args:
        model: the ``nn.Module`` to profile.
        ds_engine: the engine, when profiling inside training (adds batch size, world size and
            the engine's fwd/bwd/step latencies to the report). Default None.
        recompute_fwd_factor: share of the forward recomputed in backward by activation
            checkpointing (0.0 none, 1.0 all). Used only to estimate training FLOPs when the
            backward pass was not profiled; a profiled backward is measured. Default 0.0.

    Counting: every aten operator that runs between ``start_profile`` and ``stop_profile``
    (see ``counting.py`` for the per-operator costs). "flops" are those of matrix products,
    convolutions and attention (2 per MAC, as ``torch.utils.flop_counter`` and the 6 x params x
    tokens rule count); norms, activations, softmax and element-wise work are "other flops",
    reported beside them (``include_other=True`` adds them in). A weight used twice (tied
    embeddings) costs FLOPs at each use and counts once in the parameters. Parameters of
    ZeRO-3 models count at their full size. Nothing stays installed after ``stop_profile``.
    """

    def __init__(self, model: torch.nn.Module, ds_engine=None, recompute_fwd_factor: float = 0.0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"FlopsProfiler: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(recompute_fwd_factor, (int, float)) or recompute_fwd_factor < 0:
            raise ValueError(f"FlopsProfiler: recompute_fwd_factor must be a number >= 0 (0.0: no activation "
                             f"checkpointing, 1.0: the whole forward is recomputed), got {recompute_fwd_factor!r}")
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = float(recompute_fwd_factor)
        self.started = False
        self.engine_timings: Optional[Dict[str, float]] = None  # set by the engine before printing
        self.flops = self.macs = self.params = 0  # DeepSpeed sets these in print_model_profile
        self._counter: Optional[OpCounter] = None
        self._handles = []
        self._stack = []  # modules whose forward is running (forward and recomputation)
        # Set by the engine around its backward(): operators it runs outside autograd (gradient
        # averaging, ZeRO reduce-scatter bookkeeping) belong to the backward phase too.
        self.in_backward_scope = False
        self._synchronize = get_accelerator().synchronize
        self._reset_counts()

    # --- lifecycle ------------------------------------------------------------------------
    def start_profile(self, ignore_list=None) -> None:
        """Reset the counts and start counting: every operator from now on, per module in the forward.

        Args:
            ignore_list: module classes to not profile separately; their operators are
                attributed to the enclosing module. Default None.
        """
        if self.started:
            self.stop_profile()
        warm_up_dispatch()
        self.reset_profile()
        ignored = tuple(ignore_list or ())
        for module in self.model.modules():
            if ignored and isinstance(module, ignored):
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre_forward, prepend=True))
            self._handles.append(module.register_forward_hook(self._post_forward, always_call=True))
        self.started = True
        self.resume_profile()
        logger.info("flops profiler started")

    def pause_profile(self) -> None:
        """Stop counting operators until :meth:`resume_profile` (the engine pauses it for the optimizer step)."""
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)

    def resume_profile(self) -> None:
        """Count operators again after :meth:`pause_profile`."""
        if self.started and self._counter is None:
            self._counter = OpCounter(self._record)
            self._counter.__enter__()

    def stop_profile(self) -> None:
        """Stop counting and remove every hook; the results stay readable until :meth:`end_profile`."""
        self.pause_profile()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack = []
        if self.started:
            self._write_module_attrs()

    def reset_profile(self) -> None:
        """Zero every count (the hooks stay)."""
        self._reset_counts()
        self._write_module_attrs()

    def end_profile(self) -> None:
        """Stop profiling and drop the results, including the ``__flops__``-style module attributes."""
        if not self.started:
            return
        self.stop_profile()
        self.started = False
        for module in self.model.modules():
            for name in _MODULE_ATTRS:
                if name in module.__dict__:
                    delattr(module, name)
        logger.info("flops profiler finished")

    # --- counting -------------------------------------------------------------------------
    def _reset_counts(self) -> None:
        self._module_flops = defaultdict(int)  # module -> forward matmul-class flops of its own operators
        self._module_other = defaultdict(int)  # module -> its other forward flops (norms, element-wise...)
        self._module_macs = defaultdict(int)
        self._module_duration = defaultdict(float)  # module -> forward seconds, children included
        self._starts = {}
        self._phase_flops = dict.fromkeys(PHASES, 0)  # matrix products, convolutions, attention
        self._phase_other = dict.fromkeys(PHASES, 0)  # norms, activations, softmax, element-wise
        self._phase_macs = dict.fromkeys(PHASES, 0)
        self._op_flops = defaultdict(int)  # (phase, operator) -> flops

    def _phase(self) -> str:
        if self.in_backward_scope or _in_backward():
            # Module forwards running inside backward are checkpoint recomputation.
            return RECOMPUTE if self._stack else BACKWARD
        return FORWARD

    def _record(self, func, matmul: int, macs: int, other: int) -> None:
        phase = self._phase()
        self._phase_flops[phase] += matmul
        self._phase_other[phase] += other
        self._phase_macs[phase] += macs
        self._op_flops[(phase, str(func._overloadpacket).split(".")[-1])] += matmul + other
        if phase == FORWARD and self._stack:
            module = self._stack[-1]
            self._module_flops[module] += matmul
            self._module_other[module] += other
            self._module_macs[module] += macs
            # Live DeepSpeed-style attributes (written straight into __dict__: no Module.__setattr__).
            module.__dict__["__flops__"] = self._module_flops[module]
            module.__dict__["__macs__"] = self._module_macs[module]

    def _pre_forward(self, module, inputs) -> None:
        self._stack.append(module)
        if self._counter is not None and not _in_backward():
            self._synchronize()
            self._starts[module] = time.perf_counter()

    def _post_forward(self, module, inputs, output) -> None:
        if any(m is module for m in self._stack):
            # Normally the top; after an exception inside a child, also drop what it left.
            while self._stack.pop() is not module:
                pass
        start = self._starts.pop(module, None)
        if start is not None:
            self._synchronize()
            self._module_duration[module] += time.perf_counter() - start
            module.__dict__["__duration__"] = self._module_duration[module]

    def _write_module_attrs(self) -> None:
        for module in self.model.modules():
            module.__flops__ = self._module_flops.get(module, 0)
            module.__macs__ = self._module_macs.get(module, 0)
            module.__params__ = module_params(module)
            module.__duration__ = self._module_duration.get(module, 0.0)

    # --- results --------------------------------------------------------------------------
    def get_total_flops(self, as_string: bool = False, include_other: bool = False):
        """Forward FLOPs of matrix products, convolutions and attention (2 x MACs) counted since
        ``start_profile``; ``include_other`` adds norms, activations, softmax and element-wise
        work. See :meth:`get_flops_by_phase` for backward and recomputation."""
        total = self._phase_flops[FORWARD] + (self._phase_other[FORWARD] if include_other else 0)
        return units.number_to_string(total) if as_string else total

    def get_total_macs(self, as_string: bool = False):
        """Forward multiply-accumulates of matrix products, convolutions and attention."""
        total = self._phase_macs[FORWARD]
        return units.macs_to_string(total) if as_string else total

    def get_total_duration(self, as_string: bool = False):
        """Seconds spent in the model's forward (summed over calls) while profiling."""
        total = self.module_duration(self.model)
        return units.duration_to_string(total) if as_string else total

    def get_total_params(self, as_string: bool = False):
        """Parameters of the model: tied weights once, ZeRO-3 parameters at full size."""
        total = module_params(self.model)
        return units.params_to_string(total) if as_string else total

    def get_flops_by_phase(self) -> Dict[str, Dict[str, int]]:
        """``{"forward"|"backward"|"recompute": {"flops", "macs", "other_flops"}}`` as counted.

        ``flops``: matrix products, convolutions and attention (what ``torch.utils.flop_counter``
        counts); ``other_flops``: norms, activations, softmax, element-wise. ``recompute`` is the
        forward work redone inside backward by activation checkpointing.
        """
        return {phase: {"flops": self._phase_flops[phase], "macs": self._phase_macs[phase],
                        "other_flops": self._phase_other[phase]} for phase in PHASES}

    @property
    def backward_profiled(self) -> bool:
        """True when backward operators were counted (so training FLOPs are measured, not estimated)."""
        return self._phase_flops[BACKWARD] + self._phase_other[BACKWARD] > 0

    def get_training_flops(self, include_recompute: bool = True, include_other: bool = False) -> int:
        """FLOPs of forward plus backward (plus recomputation when ``include_recompute``; plus
        norms, activations and element-wise work when ``include_other``).

        Measured when the backward pass was profiled; otherwise estimated as forward x 3
        (backward costs two forwards) plus ``recompute_fwd_factor`` x forward.
        """
        phases = (FORWARD, BACKWARD, RECOMPUTE) if include_recompute else (FORWARD, BACKWARD)

        def total(phase):
            return self._phase_flops[phase] + (self._phase_other[phase] if include_other else 0)

        if self.backward_profiled:
            return sum(total(phase) for phase in phases)
        return int(total(FORWARD) * (3 + (self.recompute_fwd_factor if include_recompute else 0.0)))

    def get_op_flops(self, phase: str = FORWARD) -> Dict[str, int]:
        """FLOPs per aten operator name (``mm``, ``addmm``, ``_softmax``...) in ``phase``, largest first."""
        if phase not in PHASES:
            raise ValueError(f"get_op_flops: phase must be one of {PHASES}, got {phase!r}")
        found = {op: n for (p, op), n in self._op_flops.items() if p == phase}
        return dict(sorted(found.items(), key=lambda item: -item[1]))

    def module_flops(self, module: torch.nn.Module, include_other: bool = False) -> int:
        """Forward FLOPs (matmul class; ``include_other``: all) of ``module`` including its children."""
        return sum(self._module_flops.get(m, 0) + (self._module_other.get(m, 0) if include_other else 0)
                   for m in module.modules())

    def module_macs(self, module: torch.nn.Module) -> int:
        """Forward MACs of ``module`` including its children."""
        return sum(self._module_macs.get(m, 0) for m in module.modules())

    def module_duration(self, module: torch.nn.Module) -> float:
        """Forward seconds of ``module``; a container never called itself (ModuleList) sums its children."""
        return _duration(module, lambda m: self._module_duration.get(m, 0.0))

    # --- printing -------------------------------------------------------------------------
    def print_model_profile(self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1,
                            detailed: bool = True, output_file: Optional[str] = None) -> None:
        """Print the summary, the top modules per depth and (``detailed``) the module tree.

        Args:
            profile_step: the step shown in the header. Default 1.
            module_depth: deepest module level shown (-1: all). Default -1.
            top_modules: modules listed per depth in the aggregated profile. Default 1.
            detailed: print the per-module tree. Default True.
            output_file: write there instead of stdout (directories are created). Default None.
        """
        if not self.started:
            return
        from deepscale.profiling.flops_profiler.report import format_model_profile, write_report
        self.flops, self.macs, self.params = self.get_total_flops(), self.get_total_macs(), self.get_total_params()
        write_report(format_model_profile(self, profile_step, module_depth, top_modules, detailed), output_file)

    def print_model_aggregated_profile(self, module_depth: int = -1, top_modules: int = 1) -> None:
        """Print the ``top_modules`` module classes with the most parameters, MACs and forward
        latency at each depth up to ``module_depth`` (-1: all)."""
        if not self.started:
            print("no profile: call print_model_aggregated_profile after start_profile and before end_profile")
            return
        from deepscale.profiling.flops_profiler.report import format_aggregated_profile
        print(format_aggregated_profile(self, module_depth, top_modules))


# DeepSpeed's module-level readers of the attributes a running or stopped profile leaves on modules.
def get_module_flops(module: torch.nn.Module) -> int:
    """Forward FLOPs of ``module`` and its children from their ``__flops__`` attributes."""
    return sum(getattr(m, "__flops__", 0) for m in module.modules())


def get_module_macs(module: torch.nn.Module) -> int:
    """Forward MACs of ``module`` and its children from their ``__macs__`` attributes."""
    return sum(getattr(m, "__macs__", 0) for m in module.modules())


def get_module_duration(module: torch.nn.Module) -> float:
    """Forward seconds of ``module`` (``__duration__``); a container never called itself sums its children."""
    return _duration(module, lambda m: getattr(m, "__duration__", 0.0))


def _duration(module: torch.nn.Module, own) -> float:
    duration = own(module)
    if duration == 0.0:
        duration = sum(_duration(child, own) for child in module.children())
    return duration


def __getattr__(name):
    # ``from deepspeed.profiling.flops_profiler.profiler import get_model_profile`` (its home there);
    # resolved lazily because model_profile imports this module.
    if name == "get_model_profile":
        from deepscale.profiling.flops_profiler.model_profile import get_model_profile
        return get_model_profile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
