"""The parallel topology: a grid of ranks with named axes.

Note: axis order. Ranks are laid out row-major over ``("pp", "dp", "ep", "sp", "tp")`` with the
last axis varying fastest, so tensor-parallel peers (the chattiest axis) are neighbours and
land on the same node, and pipeline stages (the least chatty) are furthest apart. An axis of
degree 1 is present but trivial, so later features only set their degree.
"""
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

AXIS_ORDER: Tuple[str, ...] = ("pp", "dp", "ep", "sp", "tp")


class ParallelTopology:
    """Maps global ranks to coordinates on named parallel axes and back.

    Args:
        dp: data-parallel degree. Default: whatever ``world_size`` leaves after the others.
        pp, ep, sp, tp: pipeline, expert, sequence and tensor parallel degrees. Default 1.
        world_size: total ranks; when given, the product of the degrees must equal it.

    Note: ``ep`` subdivides the data-parallel replicas for mixture-of-experts layers; the MoE
    layer's expert process groups are built from this grid by ``comm/expert_groups.py``.
    """

    def __init__(self, dp: Optional[int] = None, pp: int = 1, ep: int = 1, sp: int = 1, tp: int = 1,
                 world_size: Optional[int] = None):
        others = pp * ep * sp * tp
        for name, value in (("pp", pp), ("ep", ep), ("sp", sp), ("tp", tp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel degree {name} must be a positive integer, got {value!r}")
        if dp is None:
            if world_size is None:
                raise ValueError("ParallelTopology needs dp or world_size")
            if world_size % others:
                raise ValueError(f"world_size {world_size} is not divisible by pp*ep*sp*tp = {others}")
            dp = world_size // others
        if not isinstance(dp, int) or dp < 1:
            raise ValueError(f"parallel degree dp must be a positive integer, got {dp!r}")
        if world_size is not None and dp * others != world_size:
            raise ValueError(f"pp({pp}) * dp({dp}) * ep({ep}) * sp({sp}) * tp({tp}) = {dp * others} "
                             f"does not equal world_size {world_size}")
        self.degrees: Dict[str, int] = {"pp": pp, "dp": dp, "ep": ep, "sp": sp, "tp": tp}
        self.world_size = dp * others
        self._strides = {}
        stride = 1
        for axis in reversed(AXIS_ORDER):
            self._strides[axis] = stride
            stride *= self.degrees[axis]

    def degree(self, axis: str) -> int:
        self._check_axis(axis)
        return self.degrees[axis]

    def coord(self, rank: int) -> Dict[str, int]:
        """Coordinates of ``rank`` on every axis."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the topology of {self.world_size} ranks")
        return {axis: (rank // self._strides[axis]) % self.degrees[axis] for axis in AXIS_ORDER}

    def rank(self, **coords: int) -> int:
        """The global rank at the given coordinates (missing axes default to 0)."""
        for axis in coords:
            self._check_axis(axis)
        return sum(coords.get(axis, 0) * self._strides[axis] for axis in AXIS_ORDER)

    def axis_groups(self, axis: str) -> List[List[int]]:
        """Every group of ranks that differ only along ``axis``, each sorted."""
        self._check_axis(axis)
        fixed_axes = [a for a in AXIS_ORDER if a != axis]
        groups = []
        for fixed in itertools.product(*(range(self.degrees[a]) for a in fixed_axes)):
            base = dict(zip(fixed_axes, fixed))
            groups.append([self.rank(**base, **{axis: i}) for i in range(self.degrees[axis])])
        return groups

    def group_of(self, axis: str, rank: int) -> List[int]:
        """The ranks sharing ``axis`` with ``rank``."""
        coord = self.coord(rank)
        return [self.rank(**{**coord, axis: i}) for i in range(self.degrees[axis])]

    def _check_axis(self, axis: str) -> None:
        if axis not in self.degrees:
            raise ValueError(f"unknown parallel axis {axis!r}; axes are {', '.join(AXIS_ORDER)}")

    def __repr__(self) -> str:
        inner = ", ".join(f"{a}={self.degrees[a]}" for a in AXIS_ORDER)
        return f"ParallelTopology({inner})"


class ProcessGroups:
    """The torch process groups of a :class:`ParallelTopology`, created once on every rank.

    ``torch.distributed.new_group`` must be called by every rank in the same order, even for
    groups it is not in; this class does that up front for the requested axes.

    Args:
        topology: the rank grid.
        axes: axes whose groups to build. Default: every axis of degree > 1.
    """

    def __init__(self, topology: ParallelTopology, axes: Optional[Sequence[str]] = None):
        from deepscale import comm as dist
        self.topology = topology
        self.rank = dist.get_rank()
        self._groups = {}
        axes = [a for a in AXIS_ORDER if topology.degrees[a] > 1] if axes is None else list(axes)
        self._self_group = None
        if any(topology.degrees[a] == 1 for a in axes) and topology.world_size > 1:
            # Degree-1 axes get a group holding only this rank; every rank creates every one.
            for r in range(topology.world_size):
                group = dist.new_group(ranks=[r])
                if r == self.rank:
                    self._self_group = group
        for axis in axes:
            if topology.degrees[axis] == 1:
                self._groups[axis] = self._self_group
                continue
            if topology.degrees[axis] == topology.world_size:
                self._groups[axis] = None  # the whole world: use the default group
                continue
            for ranks in topology.axis_groups(axis):
                group = dist.new_group(ranks=ranks)
                if self.rank in ranks:
                    self._groups[axis] = group

    def group(self, axis: str):
        """The process group of this rank along ``axis`` (``None`` means the default group)."""
        if axis not in self._groups:
            raise ValueError(f"no process group was built for axis {axis!r}; pass it in ProcessGroups(axes=...)")
        return self._groups[axis]

    def size(self, axis: str) -> int:
        return self.topology.degrees[axis]

    def axis_rank(self, axis: str) -> int:
        return self.topology.coord(self.rank)[axis]
