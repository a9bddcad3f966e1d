"""Optimizer state as parameter-name-keyed fragments, so it loads at any topology and stage.

Note: the portable optimizer format. Every training optimizer (stage 0, 1 or 2) describes the
fp32 master weights it holds as a list of :class:`OwnedFragment`: a contiguous range
``[start, start + numel)`` of one flattened named parameter, and where that range lives inside
the tensor the torch optimizer updates. A checkpoint shard is written by a rank for the
fragments it owns::

    {"format": "deepscale-fragments", "version": 1, "zero_stage": s,
     "fragments": {name: {"shape": [...], "start": int, "fp32": 1-D fp32 tensor,
                          "state": {key: 1-D tensor}}},     # elementwise optimizer state
     "group_scalars": [{key: value}, ...],   # per param group, e.g. Adam's "step"
     "param_groups": [{hyperparameters..., "names": [...]}, ...],
     "loss_scaler": {...} or None}

Loading walks the saved shards one at a time and copies the overlap of every saved fragment
with every fragment the loading rank owns, so N saving ranks and M loading ranks need not agree
on anything but parameter names, and no rank ever holds more than one shard plus its own
state. Stage 0 is the one-shard special case whose fragments are whole parameters.
"""
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence

import torch

from deepscale.utils.logging import logger

FORMAT_NAME = "deepscale-fragments"
FORMAT_VERSION = 1


@dataclass
class OwnedFragment:
    """A fragment of a named parameter held by this rank.

    Attributes:
        name: the parameter's name in ``module.named_parameters()``.
        shape: the full parameter's shape.
        start: first element of the fragment in the flattened parameter.
        numel: fragment length.
        opt_param: the tensor the torch optimizer updates (a master or a master chunk).
        offset: where the fragment starts inside ``opt_param`` (flattened).
        group_index: the optimizer param group of ``opt_param``.
    """

    name: str
    shape: tuple
    start: int
    numel: int
    opt_param: torch.Tensor
    offset: int
    group_index: int

    def master_view(self) -> torch.Tensor:
        return self.opt_param.detach().view(-1)[self.offset:self.offset + self.numel]


def _overlap(start: int, numel: int, other_start: int, other_numel: int):
    begin, end = max(start, other_start), min(start + numel, other_start + other_numel)
    return (begin, end) if begin < end else None


def _is_elementwise(value: Any, opt_param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == opt_param.shape


def _copy_scalar(value: Any) -> Any:
    return value.detach().clone() if torch.is_tensor(value) else value


def export_shard(optimizer: torch.optim.Optimizer, fragments: Sequence[OwnedFragment], param_names: List[List[str]],
                 loss_scaler=None, zero_stage: int = 0) -> dict:
    """This rank's shard of the optimizer state (see the module Note).

    Args:
        optimizer: the torch optimizer whose params are the ``opt_param`` of the fragments.
        fragments: what this rank owns.
        param_names: names of the trainable parameters of each param group.
        loss_scaler: the loss scaler, or None.
        zero_stage: recorded for information.
    """
    out_fragments: Dict[str, dict] = {}
    group_scalars: List[Dict[str, Any]] = [{} for _ in optimizer.param_groups]
    for frag in fragments:
        state = optimizer.state.get(frag.opt_param, {})
        entry = {"shape": list(frag.shape), "start": frag.start, "fp32": frag.master_view().clone(), "state": {}}
        for key, value in state.items():
            if _is_elementwise(value, frag.opt_param):
                entry["state"][key] = value.detach().view(-1)[frag.offset:frag.offset + frag.numel].clone()
            elif key not in group_scalars[frag.group_index]:
                group_scalars[frag.group_index][key] = _copy_scalar(value)
        out_fragments[frag.name] = entry
    groups = []
    for group, names in zip(optimizer.param_groups, param_names):
        hyper = {k: v for k, v in group.items() if k != "params"}
        hyper["names"] = list(names)
        groups.append(hyper)
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "zero_stage": zero_stage, "fragments": out_fragments,
            "group_scalars": group_scalars, "param_groups": groups,
            "loss_scaler": loss_scaler.state_dict() if loss_scaler is not None else None}


def check_shard(shard: Any, where: str = "checkpoint shard") -> dict:
    """Raise a clear error when ``shard`` is not in the portable format."""
    if not isinstance(shard, dict) or shard.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a deepscale portable optimizer shard (format {FORMAT_NAME!r}); was it "
                         "written by another tool or an older deepscale?")
    if shard.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{where} has format version {shard.get('version')}; this deepscale reads up to "
                         f"{FORMAT_VERSION}")
    return shard


def _state_slot(optimizer, frag: OwnedFragment, key: str, like: torch.Tensor) -> torch.Tensor:
    state = optimizer.state.setdefault(frag.opt_param, {})
    if key not in state or not _is_elementwise(state[key], frag.opt_param):
        state[key] = torch.zeros(frag.opt_param.shape, dtype=like.dtype, device=frag.opt_param.device)
    return state[key].view(-1)[frag.offset:frag.offset + frag.numel]


@torch.no_grad()
def _copy_overlaps(optimizer, own: Sequence[OwnedFragment], saved: dict, with_states: bool,
                   covered: Dict[int, int]) -> None:
    for index, frag in enumerate(own):
        entry = saved.get(frag.name)
        if entry is None:
            continue
        saved_numel = entry["fp32"].numel()
        overlap = _overlap(frag.start, frag.numel, entry["start"], saved_numel)
        if overlap is None:
            continue
        begin, end = overlap
        dst = slice(begin - frag.start, end - frag.start)
        src = slice(begin - entry["start"], end - entry["start"])
        frag.master_view()[dst].copy_(entry["fp32"][src])
        if with_states:
            for key, value in entry["state"].items():
                _state_slot(optimizer, frag, key, value)[dst].copy_(value[src])
        covered[index] = covered.get(index, 0) + (end - begin)


def _apply_groups(optimizer, own: Sequence[OwnedFragment], shard: dict, with_states: bool) -> None:
    saved_groups = shard.get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} optimizer param groups but the optimizer has "
                         f"{len(optimizer.param_groups)}; build the optimizer with the same param groups")
    if not with_states:
        return
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k not in ("params", "names")})
    scalars = shard.get("group_scalars", [])
    for frag in own:
        for key, value in (scalars[frag.group_index] if frag.group_index < len(scalars) else {}).items():
            optimizer.state.setdefault(frag.opt_param, {})[key] = _copy_scalar(value)


def import_shards(shards: Iterable[dict], optimizer: torch.optim.Optimizer, own: Sequence[OwnedFragment],
                  loss_scaler=None, load_optimizer_states: bool = True) -> None:
    """Fill this rank's fragments (fp32 masters and, optionally, optimizer state) from saved shards.

    Args:
        shards: every shard of the checkpoint (any order); consumed one at a time.
        optimizer: the torch optimizer the fragments belong to.
        own: the fragments this rank holds.
        loss_scaler: restored from the first shard when given.
        load_optimizer_states: False loads only the fp32 masters (and the loss scale).

    Raises:
        ValueError: a shard is not in the portable format, the param groups differ, or some
            owned fragment is not fully covered by the checkpoint (another model).
    """
    covered: Dict[int, int] = {}
    first = True
    for shard in shards:
        check_shard(shard)
        if first:
            _apply_groups(optimizer, own, shard, load_optimizer_states)
            if loss_scaler is not None and shard.get("loss_scaler") is not None:
                loss_scaler.load_state_dict(shard["loss_scaler"])
            first = False
        _copy_overlaps(optimizer, own, shard["fragments"], load_optimizer_states, covered)
    if first:
        raise ValueError("the checkpoint holds no optimizer shards")
    missing = [f.name for i, f in enumerate(own) if covered.get(i, 0) != f.numel]
    if missing:
        raise ValueError(f"the checkpoint does not hold the fp32 state of {len(missing)} parameter(s) this model "
                         f"trains, e.g. {missing[:3]}; was it saved from another model?")
    logger.debug(f"loaded {len(own)} optimizer fragments")


def fragments_of_whole_params(named: Sequence[tuple], group_of: Dict[int, int]) -> List[OwnedFragment]:
    """Fragments for optimizers that hold whole parameters (stage 0).

    Args:
        named: ``(name, opt_param)`` pairs; ``opt_param`` is the master (or the parameter).
        group_of: ``id(opt_param)`` -> param group index.
    """
    return [OwnedFragment(name, tuple(t.shape), 0, t.numel(), t, 0, group_of[id(t)]) for name, t in named]

