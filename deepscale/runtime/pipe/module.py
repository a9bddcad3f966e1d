"""``PipelineModule``: a model written as a list of layers, of which each rank builds only its own.

Each layer is an ``nn.Module``, a :class:`LayerSpec` (built lazily, so a rank never allocates
the layers of other stages), a :class:`TiedLayerSpec` (one module shared by several positions,
e.g. the embedding and the LM head, possibly on different stages) or a plain callable. Layers
are cut into ``num_stages * num_virtual_stages`` contiguous parts (see ``partition.py``); with
virtual stages a rank holds several parts ("model chunks") for interleaved and V-shaped schedules.

Note: parameter names. Layer ``i`` is registered under the name ``str(i)`` (its global index),
and a tied module under ``tied_modules.<key>``. Names therefore do not depend on the stage count:
a checkpoint written at one pipeline degree loads at another, and a ``torch.nn.Sequential`` of the
same layers has the same state-dict keys.
"""
import os
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from deepscale.runtime.pipe.partition import partition_layers
from deepscale.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology

PLACEMENTS = ("loop", "v")


class LayerSpec:
    """A layer to build later: ``LayerSpec(torch.nn.Linear, 8, 8)`` builds ``Linear(8, 8)`` on the
    stage that owns it.

    Args:
        typename: an ``nn.Module`` subclass.
        *module_args, **module_kwargs: its constructor arguments.
    """

    def __init__(self, typename, *module_args, **module_kwargs):
        if not (isinstance(typename, type) and issubclass(typename, torch.nn.Module)):
            raise TypeError(f"LayerSpec needs an nn.Module class, got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self, log: bool = False) -> torch.nn.Module:
        """Construct the layer."""
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        return f"LayerSpec({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every spec with the same ``key`` (on any stage).

    Args:
        key: the tie name; all specs with this key use one module (built once per rank).
        typename, *module_args, **module_kwargs: as :class:`LayerSpec`.
        forward_fn: ``forward_fn(module, inputs)`` used instead of ``module(inputs)`` at this
            position (e.g. the LM head multiplying by the embedding weight). Default None.
        tied_weight_attr: attribute name(s) of the shared parameters whose gradients are summed
            over the stages holding the key. Default ``"weight"``.
    """

    def __init__(self, key, typename, *module_args, forward_fn=None, tied_weight_attr="weight", **module_kwargs):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


def _dist_rank_and_size() -> Tuple[int, int]:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def virtual_stage_of(stage: int, chunk: int, num_stages: int, placement: str) -> int:
    """The virtual stage (position along the whole pipeline) of ``chunk`` on ``stage``.

    ``loop`` (interleaved 1F1B): chunk ``c`` of stage ``s`` is ``c * p + s``. ``v`` (ZB-V): chunk 0
    runs down the stages and chunk 1 back up, so stage 0 holds the first and the last part.
    """
    if placement == "v":
        return stage if chunk == 0 else 2 * num_stages - 1 - stage
    return chunk * num_stages + stage


def owner_of(virtual_stage: int, num_stages: int, placement: str) -> Tuple[int, int]:
    """``(stage, chunk)`` holding ``virtual_stage``; the inverse of :func:`virtual_stage_of`."""
    chunk, offset = divmod(virtual_stage, num_stages)
    if placement == "v" and chunk == 1:
        return num_stages - 1 - offset, 1
    return offset, chunk


class PipelineModule(torch.nn.Module):
    """A sequence of layers split into pipeline stages; train it with ``engine.train_batch()``.

    Args:
        layers: the layers, in order (modules, :class:`LayerSpec`, :class:`TiedLayerSpec`, callables).
            Each layer is called as ``x = layer(x)`` where ``x`` is whatever the previous layer returned.
        num_stages: the pipeline degree; required unless ``topology`` is given.
        topology: a :class:`ProcessTopology` with a ``pipe`` axis. Default: pipe x data over all ranks.
        loss_fn: ``loss_fn(outputs, labels)`` on the last stage; required for ``train_batch``.
        seed_layers: seed the RNG with ``base_seed + layer index`` before building each layer, so
            initial weights do not depend on the stage count. Default False.
        seed_fn: function called with that seed instead of ``torch.manual_seed``. Default None.
        base_seed: see ``seed_layers``. Default 1234.
        partition_method: ``"parameters"`` (balance trainable parameters, default), ``"uniform"``
            (balance layer counts), ``"type:<regex>"`` (balance layers whose class name matches) or a
            list of ``num_stages * num_virtual_stages + 1`` boundaries.
        activation_checkpoint_interval: recompute every this many layers in backward; 0 disables.
        activation_checkpoint_func: the checkpoint function. Default deepscale's ``checkpoint``.
        checkpointable_layers: class names that may be checkpointed. Default: any layer with parameters.
        num_virtual_stages: model chunks per rank for the interleaved and ZB-V schedules. Default 1.
        virtual_placement: ``"loop"`` (interleaved 1F1B) or ``"v"`` (ZB-V, needs 2 virtual stages).
    """

    def __init__(self, layers: Sequence, num_stages: Optional[int] = None, topology: Optional[ProcessTopology] = None,
                 loss_fn=None, seed_layers: bool = False, seed_fn=None, base_seed: int = 1234,
                 partition_method="parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func=None, checkpointable_layers=None, num_virtual_stages: int = 1,
                 virtual_placement: str = "loop"):
        super().__init__()
        rank, world_size = _dist_rank_and_size()
        self._topo = self._resolve_topology(num_stages, topology, world_size)
        self.num_stages = self._topo.get_dim("pipe")
        self.global_rank = rank
        self.stage_id = self._topo.get_coord(rank).pipe
        self._check_virtual(num_virtual_stages, virtual_placement)
        self.num_virtual_stages, self.virtual_placement = num_virtual_stages, virtual_placement
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        if activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}")
        self.activation_checkpoint_interval = int(activation_checkpoint_interval)
        if activation_checkpoint_func is None:
            from deepscale.runtime.activation_checkpointing import checkpoint
            activation_checkpoint_func = checkpoint
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = checkpointable_layers
        self._layer_specs = list(layers)
        self.partition_method = partition_method
        self.parts = partition_layers(partition_method, self.num_stages * num_virtual_stages, len(self._layer_specs),
                                      self._layer_names, self._layer_param_counts)
        self.tied_modules = torch.nn.ModuleDict()
        self.tied_weight_attrs: Dict[str, List[str]] = {}
        self.tied_stages = self._tied_stage_map()
        self._chunks: List[List[Tuple[int, object]]] = []
        for chunk in range(num_virtual_stages):
            self._chunks.append(self._build_chunk(self.chunk_layer_range(chunk)))

    # --- construction ---------------------------------------------------------------------
    @staticmethod
    def _resolve_topology(num_stages, topology, world_size) -> ProcessTopology:
        if topology is not None:
            if "pipe" not in topology.get_axis_names():
                raise ValueError(f"PipelineModule topology needs a 'pipe' axis, got axes {topology.get_axis_names()}")
            if topology.world_size() != world_size:
                raise ValueError(f"PipelineModule topology has {topology.world_size()} ranks but the world has "
                                 f"{world_size}")
            if num_stages is not None and num_stages != topology.get_dim("pipe"):
                raise ValueError(f"num_stages={num_stages} disagrees with the topology's pipe degree "
                                 f"{topology.get_dim('pipe')}")
            return topology
        if num_stages is None:
            raise ValueError("PipelineModule needs num_stages or topology")
        if num_stages < 1 or world_size % num_stages:
            raise ValueError(f"num_stages={num_stages} must be positive and divide the world size {world_size}")
        return PipeDataParallelTopology(num_pp=num_stages, num_dp=world_size // num_stages)

    @staticmethod
    def _check_virtual(num_virtual_stages: int, placement: str) -> None:
        if not isinstance(num_virtual_stages, int) or num_virtual_stages < 1:
            raise ValueError(f"num_virtual_stages must be a positive integer, got {num_virtual_stages!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"virtual_placement={placement!r}; allowed: {', '.join(PLACEMENTS)}")
        if placement == "v" and num_virtual_stages != 2:
            raise ValueError(f"virtual_placement='v' (ZB-V) needs num_virtual_stages=2, got {num_virtual_stages}")

    def _layer_names(self) -> List[str]:
        names = []
        for spec in self._layer_specs:
            if isinstance(spec, LayerSpec):
                names.append(spec.typename.__name__)
            else:
                names.append(type(spec).__name__ if isinstance(spec, torch.nn.Module) else
                             getattr(spec, "__name__", type(spec).__name__))
        return names

    def _layer_param_counts(self) -> List[int]:
        counts = []
        for spec in self._layer_specs:
            if isinstance(spec, LayerSpec):
                with torch.random.fork_rng(devices=[]):
                    module = spec.build()  # built to count, then dropped (as DeepSpeed does)
                counts.append(sum(p.numel() for p in module.parameters() if p.requires_grad))
            elif isinstance(spec, torch.nn.Module):
                counts.append(sum(p.numel() for p in spec.parameters() if p.requires_grad))
            else:
                counts.append(0)
        return counts

    def _tied_stage_map(self) -> Dict[str, List[int]]:
        """Tie key -> the pipeline stages holding it (computed from the partition on every rank alike)."""
        stages: Dict[str, set] = {}
        for vs in range(self.num_stages * self.num_virtual_stages):
            stage, _ = owner_of(vs, self.num_stages, self.virtual_placement)
            for index in range(self.parts[vs], self.parts[vs + 1]):
                spec = self._layer_specs[index]
                if isinstance(spec, TiedLayerSpec):
                    stages.setdefault(spec.key, set()).add(stage)
        return {key: sorted(s) for key, s in sorted(stages.items())}

    def chunk_layer_range(self, chunk: int = 0) -> Tuple[int, int]:
        """``(start, stop)`` global layer indices of this rank's ``chunk``."""
        vs = virtual_stage_of(self.stage_id, chunk, self.num_stages, self.virtual_placement)
        return self.parts[vs], self.parts[vs + 1]

    def _build_chunk(self, layer_range: Tuple[int, int]) -> List[Tuple[int, object]]:
        funcs = []
        for index in range(*layer_range):
            spec = self._layer_specs[index]
            if self.seed_layers:
                (self.seed_fn or torch.manual_seed)(self.base_seed + index)
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                    self.tied_weight_attrs[spec.key] = spec.tied_weight_attr
                module = self.tied_modules[spec.key]
                funcs.append((index, partial(spec.forward_fn, module) if spec.forward_fn else module))
            elif isinstance(spec, LayerSpec):
                module = spec.build()
                self.add_module(str(index), module)
                funcs.append((index, module))
            elif isinstance(spec, torch.nn.Module):
                self.add_module(str(index), spec)
                funcs.append((index, spec))
            elif callable(spec):
                funcs.append((index, spec))
            else:
                raise TypeError(f"PipelineModule layer {index} is a {type(spec).__name__}; layers must be "
                                "nn.Modules, LayerSpecs or callables")
        return funcs

    # --- running --------------------------------------------------------------------------
    def forward(self, inputs, chunk: int = 0):
        """Run this rank's ``chunk`` of layers on ``inputs`` (with activation checkpointing if set)."""
        funcs = self._chunks[chunk]
        interval = self.activation_checkpoint_interval
        if interval == 0 or not torch.is_grad_enabled():
            return _run_layers(funcs, inputs)
        x = inputs
        for start in range(0, len(funcs), interval):
            group = funcs[start:start + interval]
            if self._is_checkpointable(group):
                args = x if isinstance(x, tuple) else (x,)
                x = self.activation_checkpoint_func(partial(_run_layers_varargs, group), *args)
            else:
                x = _run_layers(group, x)
        return x

    def _is_checkpointable(self, group) -> bool:
        funcs = [f for _, f in group]
        if self.checkpointable_layers is not None:
            return all(type(f).__name__ in self.checkpointable_layers for f in funcs)
        return any(isinstance(f, torch.nn.Module) and any(True for _ in f.parameters()) for f in funcs)

    # --- what the engine and users read ---------------------------------------------------
    def topology(self) -> ProcessTopology:
        return self._topo

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def tied_parameters(self, key: str) -> List[torch.nn.Parameter]:
        """The shared parameters of tie ``key`` on this rank."""
        module = self.tied_modules[key]
        return [getattr(module, attr) for attr in self.tied_weight_attrs[key]]

    def local_layer_modules(self) -> Dict[int, Tuple[str, torch.nn.Module]]:
        """Global layer index -> (state-dict prefix, module) of this rank's layers with state."""
        out = {}
        for chunk in self._chunks:
            for index, _ in chunk:
                spec = self._layer_specs[index]
                if isinstance(spec, TiedLayerSpec):
                    out[index] = (f"tied_modules.{spec.key}.", self.tied_modules[spec.key])
                elif str(index) in self._modules:
                    out[index] = (f"{index}.", self._modules[str(index)])
        return out

    def ckpt_layer_path(self, ckpt_dir: str, layer_index: int) -> str:
        """The file of layer ``layer_index`` in a checkpoint tag directory."""
        return os.path.join(ckpt_dir, f"layer_{layer_index:02d}-model_states.pt")


def _run_layers(funcs, x):
    for _, func in funcs:
        x = func(x)
    return x


def _run_layers_varargs(funcs, *args):
    return _run_layers(funcs, args[0] if len(args) == 1 else args)
