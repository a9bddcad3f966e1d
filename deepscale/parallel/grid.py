"""The parallel grid as a Megatron-style model-parallel unit (``mpu``).

:class:`ParallelGrid` builds the process groups of a :class:`~deepscale.comm.ParallelTopology`
once (every rank, same order) and answers the questions Megatron code and DeepSpeed clients ask
(``get_model_parallel_group``, ``get_data_parallel_rank``, ``get_sequence_parallel_world_size``,
the pipeline ones, ...). ``deepscale.initialize`` builds one from the config's
``tensor_parallel`` and ``sequence_parallel_size`` when no ``mpu`` is passed.

Note: the sequence-data-parallel group. Ulysses ranks hold the same weights and see different
tokens of the same samples, so for gradient averaging and ZeRO partitioning they join the
data-parallel ranks (as in DeepSpeed): the engine reduces over ``dp x sp``. Batch-size
arithmetic and the data loader use the data-parallel degree alone (sp peers read the same batch).
"""
from typing import Dict, Optional, Sequence, Tuple

from deepscale import comm as dist
from deepscale.comm.topology import AXIS_ORDER, ParallelTopology, ProcessGroups

_CURRENT: Optional["ParallelGrid"] = None


def _combined_groups(topology: ParallelTopology, axes: Sequence[str], rank: int):
    """Create (on every rank) the groups of ranks that differ only along ``axes``; return this rank's."""
    keyed: Dict[Tuple[int, ...], list] = {}
    for r in range(topology.world_size):
        coord = topology.coord(r)
        keyed.setdefault(tuple(coord[a] for a in AXIS_ORDER if a not in axes), []).append(r)
    mine = None
    for ranks in keyed.values():
        group = dist.new_group(ranks=ranks) if len(ranks) < topology.world_size else None
        if rank in ranks:
            mine = group
    return mine


class ParallelGrid:
    """Process groups of every axis of ``topology`` with the mpu interface.

    Args:
        topology: the rank grid (its world size must equal the job's).
    """

    def __init__(self, topology: ParallelTopology):
        world = dist.get_world_size()
        if topology.world_size != world:
            raise ValueError(f"parallel grid {topology} has {topology.world_size} ranks but the job has {world}; "
                             "the product of the parallel degrees must equal the number of processes")
        self.topology = topology
        self.rank = dist.get_rank()
        self.groups = ProcessGroups(topology, axes=AXIS_ORDER)
        self._seq_dp = _combined_groups(topology, ("dp", "sp"), self.rank)
        self._model = _combined_groups(topology, ("pp", "tp"), self.rank)

    # --- generic ---------------------------------------------------------------------------
    def coord(self, axis: str) -> int:
        return self.topology.coord(self.rank)[axis]

    def size(self, axis: str) -> int:
        return self.topology.degree(axis)

    def group(self, axis: str):
        return self.groups.group(axis)

    def __repr__(self) -> str:
        return f"ParallelGrid({self.topology}, rank={self.rank})"

    # --- tensor (model) parallel ------------------------------------------------------------
    def get_model_parallel_group(self):
        return self.group("tp")

    def get_model_parallel_world_size(self) -> int:
        return self.size("tp")

    def get_model_parallel_rank(self) -> int:
        return self.coord("tp")

    def get_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 in this rank's group."""
        return self.topology.rank(**{**self.topology.coord(self.rank), "tp": 0})

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_slice_parallel_group = get_model_parallel_group
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_rank = get_model_parallel_rank

    # --- data parallel ----------------------------------------------------------------------
    def get_data_parallel_group(self):
        return self.group("dp")

    def get_data_parallel_world_size(self) -> int:
        return self.size("dp")

    def get_data_parallel_rank(self) -> int:
        return self.coord("dp")

    # --- sequence parallel (Ulysses) --------------------------------------------------------
    def get_sequence_parallel_group(self):
        return self.group("sp")

    def get_sequence_parallel_world_size(self) -> int:
        return self.size("sp")

    def get_sequence_parallel_rank(self) -> int:
        return self.coord("sp")

    def get_sequence_data_parallel_group(self):
        return self._seq_dp

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.size("dp") * self.size("sp")

    def get_sequence_data_parallel_rank(self) -> int:
        return self.coord("dp") * self.size("sp") + self.coord("sp")

    # --- pipeline ---------------------------------------------------------------------------
    def get_pipe_parallel_group(self):
        return self.group("pp")

    def get_pipe_parallel_world_size(self) -> int:
        return self.size("pp")

    def get_pipe_parallel_rank(self) -> int:
        return self.coord("pp")

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank

    def get_model_and_pipe_parallel_group(self):
        """Ranks holding different parts of one model replica (tp x pp)."""
        return self._model


def build_parallel_grid(tp: int = 1, sp: int = 1, pp: int = 1, register: bool = True) -> ParallelGrid:
    """Build the grid for the given degrees over all ranks (data parallelism takes the rest).

    Every rank must call it (it creates process groups). With ``register`` (default True) it
    becomes the current grid (:func:`get_parallel_grid`) and ``deepscale.utils.groups.mpu``.

    Raises:
        ValueError: the world size is not divisible by ``tp * sp * pp``.
    """
    global _CURRENT
    topology = ParallelTopology(world_size=dist.get_world_size(), tp=tp, sp=sp, pp=pp)
    grid = ParallelGrid(topology)
    if register:
        _CURRENT = grid
        from deepscale.utils import groups
        groups.mpu = grid
    return grid


def get_parallel_grid() -> Optional[ParallelGrid]:
    """The grid registered by :func:`build_parallel_grid` (or by ``initialize``), if any."""
    return _CURRENT


def reset_parallel_grid() -> None:
    """Forget the registered grid (tests, or a new job in the same process)."""
    global _CURRENT
    _CURRENT = None
    from deepscale.utils import groups
    if isinstance(groups.mpu, ParallelGrid):
        groups.mpu = None
