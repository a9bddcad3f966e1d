"""Cutting a list of layers into contiguous pipeline parts (pure functions, no torch process state).

A partition is a list of ``num_parts + 1`` boundaries: part ``i`` holds layers
``bounds[i]:bounds[i + 1]``. Every part must hold at least one layer.
"""
import re
from typing import Callable, List, Sequence, Union


def partition_uniform(num_items: int, num_parts: int) -> List[int]:
    """Boundaries giving each part ``num_items // num_parts`` items, the first parts one more."""
    _check_counts(num_items, num_parts)
    base, extra = divmod(num_items, num_parts)
    bounds = [0]
    for part in range(num_parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return bounds


def partition_balanced(weights: Sequence[float], num_parts: int) -> List[int]:
    """Contiguous boundaries minimising the heaviest part (each part non-empty).

    Exact dynamic programme over (layers, parts): O(n^2 p), fine for the few hundred layers of a
    model. Among equally heavy answers the one with the earliest cuts is taken, so results
    are deterministic on every rank.
    """
    n = len(weights)
    _check_counts(n, num_parts)
    prefix = [0.0]
    for w in weights:
        if w < 0:
            raise ValueError(f"layer weights must be non-negative, got {w}")
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[k][i]: the lightest possible heaviest part when the first i layers form k parts.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    for k in range(num_parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def check_bounds(bounds: Sequence[int], num_items: int, num_parts: int) -> List[int]:
    """Validate an explicit list of boundaries; returns it as a list of ints."""
    bounds = [int(b) for b in bounds]
    if len(bounds) != num_parts + 1 or bounds[0] != 0 or bounds[-1] != num_items:
        raise ValueError(f"partition_method as a list must be {num_parts + 1} boundaries from 0 to {num_items} "
                         f"(one more than the number of stages), got {bounds}")
    for part, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi <= lo:
            raise ValueError(f"partition_method {bounds} leaves stage {part} empty (layers {lo}:{hi}); every "
                             "stage needs at least one layer")
    return bounds


def partition_layers(method: Union[str, Sequence[int]], num_parts: int, num_layers: int,
                     layer_names: Callable[[], List[str]], layer_param_counts: Callable[[], List[int]]) -> List[int]:
    """Boundaries for ``method``: ``"parameters"``, ``"uniform"``, ``"type:<regex>"`` or a boundary list.

    Args:
        method: the partition method (case-insensitive for the names).
        num_parts: the number of parts (pipeline stages times virtual stages).
        num_layers: the number of layers.
        layer_names: returns each layer's class (or function) name; called for ``type:``.
        layer_param_counts: returns each layer's trainable parameter count; called for ``parameters``.
    """
    _check_counts(num_layers, num_parts)
    if not isinstance(method, str):
        return check_bounds(method, num_layers, num_parts)
    lowered = method.lower()
    if lowered == "uniform":
        return partition_uniform(num_layers, num_parts)
    if lowered == "parameters":
        return partition_balanced(layer_param_counts(), num_parts)
    if lowered.startswith("type:"):
        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        weights = [1 if pattern.search(name) else 0 for name in layer_names()]
        if sum(weights) < num_parts:
            raise ValueError(f"partition_method={method!r} matches {sum(weights)} layer(s), fewer than the "
                             f"{num_parts} stages; match more layers or use 'parameters' or 'uniform'")
        return partition_balanced(weights, num_parts)
    raise ValueError(f"partition_method={method!r} is not known; use 'parameters', 'uniform', 'type:<regex>' or "
                     "a list of stage boundaries")


def _check_counts(num_items: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ValueError(f"the number of pipeline stages must be positive, got {num_parts}")
    if num_items < num_parts:
        raise ValueError(f"the PipelineModule has {num_items} layer(s) but {num_parts} pipeline stage(s) (times "
                         "virtual stages); every stage needs at least one layer: use fewer stages or more layers")
