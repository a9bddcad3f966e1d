"""DeepSpeed's topology classes (``ProcessTopology`` and the pipeline grids) over deepscale's rank grid.

DeepSpeed users build grids with axis names ``pipe``, ``data`` and ``model``; deepscale's
:class:`~deepscale.comm.topology.ParallelTopology` names them ``pp``, ``dp`` and ``tp``. When a
grid's axes are known names in deepscale's axis order (always true for
:class:`PipeDataParallelTopology` and :class:`PipeModelDataParallelTopology`), the grid is backed
by a ``ParallelTopology`` (``topology.parallel``), so the pipeline engine, tensor parallelism and
ZeRO all read one object. Any other axis list still works as a plain row-major grid.
"""
import itertools
from collections import namedtuple
from typing import Dict, List, Optional, Sequence

from deepscale.comm.topology import AXIS_ORDER, ParallelTopology

#: DeepSpeed axis name -> deepscale axis name.
AXIS_ALIASES: Dict[str, str] = {"pipe": "pp", "data": "dp", "model": "tp", "tensor": "tp", "expert": "ep",
                                "sequence": "sp"}


def _backing_topology(axes: Sequence[str], dims: Sequence[int]) -> Optional[ParallelTopology]:
    names = [AXIS_ALIASES.get(a, a) for a in axes]
    if len(set(names)) != len(names) or any(n not in AXIS_ORDER for n in names):
        return None
    order = [AXIS_ORDER.index(n) for n in names]
    if order != sorted(order):
        return None  # a different nesting than deepscale's: keep it as a plain grid
    return ParallelTopology(**dict(zip(names, dims)), **({"dp": 1} if "dp" not in names else {}))


class ProcessTopology:
    """A row-major grid of ranks with named axes (the last axis varies fastest).

    Args:
        axes: axis names, outermost first (e.g. ``["pipe", "data"]``).
        dims: the degree of each axis.
    """

    def __init__(self, axes: Sequence[str], dims: Sequence[int]):
        axes, dims = list(axes), [int(d) for d in dims]
        if len(axes) != len(dims):
            raise ValueError(f"ProcessTopology: {len(axes)} axes {axes} but {len(dims)} dims {dims}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"ProcessTopology: axis names must be distinct, got {axes}")
        if any(d < 1 for d in dims):
            raise ValueError(f"ProcessTopology: every dim must be a positive integer, got {dims}")
        self.axes, self.dims = axes, dims
        self.ProcessCoord = namedtuple("ProcessCoord", axes)
        self.parallel = _backing_topology(axes, dims)
        self._ranks = {}
        for rank, coord in enumerate(itertools.product(*(range(d) for d in dims))):
            self._ranks[self.ProcessCoord(*coord)] = rank
        if self.parallel is not None:
            # The two layouts are the same row-major order; this guards that invariant.
            for coord, rank in self._ranks.items():
                assert self.parallel.rank(**{AXIS_ALIASES.get(a, a): c for a, c in zip(axes, coord)}) == rank

    def get_rank(self, **coord_kwargs) -> int:
        """The global rank at the given coordinates (every axis must be given)."""
        if set(coord_kwargs) != set(self.axes):
            raise ValueError(f"get_rank needs one coordinate per axis {self.axes}, got {sorted(coord_kwargs)}")
        key = self.ProcessCoord(**coord_kwargs)
        if key not in self._ranks:
            raise ValueError(f"get_rank: coordinates {coord_kwargs} are outside the grid {dict(zip(self.axes, self.dims))}")
        return self._ranks[key]

    def get_axis_names(self) -> List[str]:
        return list(self.axes)

    def get_rank_repr(self, rank: int, omit_axes=("data", "pipe"), inner_sep: str = "_", outer_sep: str = "-") -> str:
        """A string such as ``model_01`` naming ``rank`` by its coordinates on the axes not omitted."""
        coord = self.get_coord(rank)
        parts = [f"{axis}{inner_sep}{getattr(coord, axis):02d}" for axis in self.axes if axis not in omit_axes]
        return outer_sep.join(parts)

    def get_dim(self, axis: str) -> int:
        """The degree of ``axis`` (0 for an axis the grid does not have, as DeepSpeed)."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_coord(self, rank: int):
        """The ``ProcessCoord`` namedtuple of ``rank``."""
        for coord, r in self._ranks.items():
            if r == rank:
                return coord
        raise ValueError(f"rank {rank} is not in this topology of {self.world_size()} ranks")

    def get_axis_comm_lists(self, axis: str) -> List[List[int]]:
        """Every group of ranks that differ only along ``axis`` (empty for an unknown axis)."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for fixed in itertools.product(*(range(self.get_dim(a)) for a in others)):
            base = dict(zip(others, fixed))
            lists.append([self.get_rank(**base, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    def filter_match(self, **filter_kwargs) -> List[int]:
        """Ranks whose coordinates match every given ``axis=value``."""
        return [rank for coord, rank in self._ranks.items()
                if all(getattr(coord, axis) == value for axis, value in filter_kwargs.items())]

    def get_axis_list(self, axis: str, idx: int) -> List[int]:
        """Ranks whose coordinate on ``axis`` is ``idx``."""
        return self.filter_match(**{axis: idx}) if axis in self.axes else []

    def world_size(self) -> int:
        return len(self._ranks)

    def __str__(self) -> str:
        return str(self._ranks)


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline stages outermost, data-parallel replicas inside: ``axes=["pipe", "data"]``."""

    def __init__(self, num_pp: int, num_dp: int):
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline, data and tensor ("model") parallelism: ``axes=["pipe", "data", "model"]``, tensor
    parallel peers adjacent."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int):
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])
