"""3D parallelism: tensor x pipeline x data parallel groups for the pipeline engine.

A :class:`~deepscale.runtime.pipe.module.PipelineModule` carries its rank grid (its topology);
tensor-parallel layers inside its stages need the tensor-parallel group when they are built. This
module reconciles the three places a layout can come from, so every part reads one grid:

- a Megatron-style ``mpu`` passed to ``deepscale.initialize`` (``get_model_parallel_*``,
  ``get_data_parallel_*``, ``get_pipe_parallel_*`` or ``get_pipeline_model_parallel_*``): its
  degrees and this rank's coordinates must agree with the module's topology, and its groups are used;
- otherwise the module's topology (``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`` has a
  ``model`` axis): the :class:`~deepscale.parallel.grid.ParallelGrid` of that layout, reused when one
  is already registered (``deepscale.parallel.build_parallel_grid(tp=..., pp=...)``, which the
  layers were built with) and registered otherwise;
- the config's ``tensor_parallel.tp.tp_size`` / ``autotp_size`` must equal the topology's ``model``
  degree (1 when the topology has none).

Gradients are then reduced over the data-parallel group of each (stage, tensor-rank) pair, the
global norm sums tensor-parallel shards once per shard and replicated weights once (see
``TrainingOptimizer.global_grad_norm``) before the pipeline engine adds the other stages.
"""
from typing import Any, Dict, Optional

from deepscale import comm as dist
from deepscale.parallel.grid import build_parallel_grid, get_parallel_grid
from deepscale.runtime.model_parallel_setup import degrees_from_raw

# (ParallelTopology axis, DeepSpeed topology axis, accessor names of an mpu: rank, world size)
_AXES = (
    ("pp", "pipe", ("get_pipe_parallel_rank", "get_pipeline_model_parallel_rank"),
     ("get_pipe_parallel_world_size", "get_pipeline_model_parallel_world_size")),
    ("dp", "data", ("get_data_parallel_rank",), ("get_data_parallel_world_size",)),
    ("tp", "model", ("get_model_parallel_rank", "get_tensor_model_parallel_rank"),
     ("get_model_parallel_world_size", "get_tensor_model_parallel_world_size")),
)


def _call_first(mpu, names, what: str) -> int:
    for name in names:
        if hasattr(mpu, name):
            return int(getattr(mpu, name)())
    if what == "pp":  # a Megatron mpu without pipeline accessors describes a model that is not pipelined
        return -1
    raise TypeError(f"deepscale.initialize(mpu=...): the mpu ({type(mpu).__name__}) has none of {', '.join(names)}")


def check_mpu_layout(mpu, topology) -> None:
    """Raise ``ValueError`` unless ``mpu`` describes the same layout as the PipelineModule's ``topology``.

    Compares the pipeline, data and tensor-parallel degrees and this rank's coordinate on each.
    """
    coord = topology.get_coord(dist.get_rank())._asdict()
    for axis, ds_axis, rank_names, size_names in _AXES:
        want_size = max(topology.get_dim(ds_axis), 1)
        want_rank = coord.get(ds_axis, 0)
        size = _call_first(mpu, size_names, axis)
        rank = _call_first(mpu, rank_names, axis)
        if size == -1:  # no pipeline accessors: fine for a single stage only
            if want_size == 1:
                continue
            raise TypeError(f"deepscale.initialize(mpu=...): the PipelineModule has {want_size} stages but the mpu "
                            f"({type(mpu).__name__}) has none of {', '.join(size_names)}")
        if size != want_size or rank != want_rank:
            raise ValueError(
                f"deepscale.initialize(mpu=...): the mpu puts rank {dist.get_rank()} at {ds_axis} coordinate {rank} "
                f"of {size}, but the PipelineModule's topology has it at {want_rank} of {want_size}. Build the "
                "PipelineModule with the same layout, e.g. topology=PipeModelDataParallelTopology(num_pp, num_mp, "
                "num_dp) with pipeline stages outermost and tensor-parallel ranks adjacent")


def _check_config_degrees(topology, raw: Optional[Dict[str, Any]]) -> None:
    if not raw:
        return
    degrees = degrees_from_raw(raw)
    tp = max(topology.get_dim("model"), 1)
    if degrees["tp"] > 1 and degrees["tp"] != tp:
        raise ValueError(
            f"tensor_parallel size {degrees['tp']} in the config but the PipelineModule's topology has a tensor "
            f"('model') degree of {tp}; build the module with topology=PipeModelDataParallelTopology(num_pp, "
            f"num_mp={degrees['tp']}, num_dp) and its layers with that grid's tensor-parallel group")
    if degrees["autotp"]:
        raise ValueError("tensor_parallel.autotp_size with a PipelineModule: AutoTP shards a whole model; build "
                         "the pipeline's layers from deepscale.parallel's tensor-parallel layers instead")
    if degrees["sp"] > 1:
        raise ValueError("sequence_parallel_size > 1 with a PipelineModule is not supported; use Ulysses "
                         "without pipelining, or pipeline x tensor x data parallelism")


def pipeline_mpu(model, raw_config: Optional[Dict[str, Any]] = None, mpu=None):
    """The model-parallel unit the pipeline engine for ``model`` uses (see the module docstring).

    Args:
        model: the PipelineModule.
        raw_config: the DeepSpeed-format config dict (checked against the topology). Default None.
        mpu: the ``mpu`` given to ``initialize``. Default None.

    Returns:
        ``mpu`` (checked), the matching :class:`ParallelGrid`, or None for a topology with axes
        deepscale's grid does not name (the pipeline grid then builds its own groups).
    """
    topology = model.topology()
    _check_config_degrees(topology, raw_config)
    if mpu is not None:
        check_mpu_layout(mpu, topology)
        return mpu
    if topology.parallel is None:
        return None
    current = get_parallel_grid()
    if current is not None and current.topology.degrees == topology.parallel.degrees:
        return current
    degrees = topology.parallel.degrees
    if degrees["tp"] == 1:
        return None  # no layer needs a tensor-parallel group: the pipeline grid builds pp x dp itself
    return build_parallel_grid(tp=degrees["tp"], sp=degrees["sp"], pp=degrees["pp"])
