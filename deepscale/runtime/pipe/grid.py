"""The process groups of a pipeline topology, with DeepSpeed's ``mpu`` accessor names.

Every rank creates every group in the same order (``torch.distributed.new_group`` is collective
over the world), then keeps the ones it belongs to: its data-parallel group (the replicas of its
stage), its pipeline group (the stages of its replica), its tensor-parallel group when the
topology has a ``model`` axis, and one group per tied-layer key (the stages holding that key).

Where the topology is backed by deepscale's :class:`~deepscale.comm.topology.ParallelTopology`
(always for the DeepSpeed grid classes), the axis groups are not built here: they come from a
Megatron-style ``mpu`` (``deepscale.parallel.ParallelGrid`` or the user's) or from
:class:`~deepscale.comm.topology.ProcessGroups`, the one place that builds groups from a topology.
"""
from typing import Dict, List, Optional

from deepscale import comm as dist
from deepscale.comm.topology import ProcessGroups
from deepscale.runtime.pipe.topology import ProcessTopology


class PipelineGrid:
    """Groups and coordinates of this rank in a :class:`ProcessTopology` with a ``pipe`` axis.

    Args:
        topology: the rank grid (``pipe`` and ``data`` axes, optionally ``model``).
        tied_stages: tie key -> the pipeline stages holding it (``PipelineModule.tied_stages``).
        mpu: a Megatron-style model-parallel unit whose data, pipeline and tensor-parallel groups
            to use (its layout must match ``topology``). Default None: build them.
    """

    def __init__(self, topology: ProcessTopology, tied_stages: Optional[Dict[str, List[int]]] = None, mpu=None):
        self.topology = topology
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        coord = topology.get_coord(self.global_rank)
        self._coord = coord._asdict()
        self.stage_id = coord.pipe
        self.pipe_parallel_size = topology.get_dim("pipe")
        self.data_parallel_size = max(topology.get_dim("data"), 1)
        self.model_parallel_size = max(topology.get_dim("model"), 1)
        self.data_parallel_id = self._coord.get("data", 0)
        if mpu is None and topology.parallel is not None:
            groups = ProcessGroups(topology.parallel, axes=("pp", "dp", "tp"))
            self.dp_group, self.pp_group, self.tp_group = groups.group("dp"), groups.group("pp"), groups.group("tp")
        elif mpu is not None:
            self.dp_group = mpu.get_data_parallel_group()
            pipe = _first_attr(mpu, "get_pipe_parallel_group", "get_pipeline_model_parallel_group", required=False)
            # An mpu without pipeline accessors is accepted for a single stage (tp_compose.check_mpu_layout).
            self.pp_group = pipe() if pipe is not None else self._axis_group("pipe")
            self.tp_group = _first_attr(mpu, "get_model_parallel_group", "get_tensor_model_parallel_group")()
        else:
            self.dp_group = self._axis_group("data")
            self.pp_group = self._axis_group("pipe")
            self.tp_group = self._axis_group("model")
        self.tied_groups: Dict[str, object] = {}
        self.tied_ranks: Dict[str, List[int]] = {}
        for key, stages in sorted((tied_stages or {}).items()):
            self._build_tied_group(key, stages)

    def _axis_group(self, axis: str):
        if axis not in self.topology.get_axis_names():
            return self._self_group()
        mine = None
        for ranks in self.topology.get_axis_comm_lists(axis):
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                mine = group
        return mine

    def _self_group(self):
        mine = None
        for rank in range(self.world_size):
            group = dist.new_group(ranks=[rank])
            if rank == self.global_rank:
                mine = group
        return mine

    def _build_tied_group(self, key: str, stages: List[int]) -> None:
        others = [a for a in self.topology.get_axis_names() if a != "pipe"]
        seen = set()
        for rank in range(self.world_size):
            coord = self.topology.get_coord(rank)._asdict()
            fixed = tuple(coord[a] for a in others)
            if fixed in seen:
                continue
            seen.add(fixed)
            ranks = [self.topology.get_rank(pipe=s, **dict(zip(others, fixed))) for s in stages]
            group = dist.new_group(ranks=ranks) if len(ranks) > 1 else None
            if self.global_rank in ranks:
                self.tied_groups[key], self.tied_ranks[key] = group, ranks

    def stage_to_global(self, stage_id: int) -> int:
        """The global rank of pipeline stage ``stage_id`` in this rank's replica."""
        return self.topology.get_rank(**{**self._coord, "pipe": stage_id})

    # --- DeepSpeed's mpu interface ------------------------------------------------------------
    def get_stage_id(self) -> int:
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        return self.data_parallel_id

    def get_global_rank(self) -> int:
        return self.global_rank

    def get_pipe_parallel_rank(self) -> int:
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self):
        return self.pp_group

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_model_parallel_rank(self) -> int:
        return self._coord.get("model", 0)

    def get_model_parallel_world_size(self) -> int:
        return self.model_parallel_size

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def _first_attr(obj, *names, required: bool = True):
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    if not required:
        return None
    raise TypeError(f"the mpu ({type(obj).__name__}) has none of {', '.join(names)}")
