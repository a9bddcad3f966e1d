"""Mixture-of-experts checkpoints: expert weights saved one file per expert, under global names.

Note: local and global expert names. With expert parallelism a rank holds ``L`` of the ``E``
experts of each MoE layer, as ``...deepspeed_experts.{0..L-1}``; the ranks of one expert-parallel
group hold different experts under the same local names. A checkpoint therefore names experts
globally: local expert ``i`` on expert-parallel rank ``r`` is expert ``r * L + i``. The fp32
masters and optimizer states in the optimizer shards carry global names (every optimizer names
its fragments with :func:`checkpoint_param_names`), and the model weights of each expert are
written by the first rank of its expert-data-parallel group to
``layer_{l}_expert_{e}_mp_rank_00_model_states.pt`` (DeepSpeed's file name; ``l`` counts MoE
layers in ``named_modules`` order), holding ``{global name: tensor}``. The main model-states file
holds the dense weights only. A checkpoint saved at one expert-parallel degree therefore loads at
another: each rank reads the files of the experts it now holds, and the optimizer shards are
re-sliced by name as for any ZeRO checkpoint; ``zero_to_fp32`` returns every expert under its
global name (the names of the same model at ``ep_size=1``).

MoE layers are recognised by duck typing (``deepspeed_moe.experts.deepspeed_experts``,
``num_local_experts`` and ``global_expert_index``) so the runtime does not import ``deepscale.moe``.
"""
import os
from typing import Dict, Iterator, List, Tuple

import torch

from deepscale.comm.expert_groups import expert_groups_of_param

EXPERT_FILE_FORMAT = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
_EXPERTS_ATTR = "deepspeed_experts"


def _moe_layers(module: torch.nn.Module) -> Iterator[Tuple[int, str, torch.nn.Module]]:
    """``(layer id, module name, layer)`` of every MoE layer."""
    layer_id = 0
    for name, sub in module.named_modules():
        experts = getattr(getattr(getattr(sub, "deepspeed_moe", None), "experts", None), _EXPERTS_ATTR, None)
        if experts is not None and hasattr(sub, "global_expert_index"):
            yield layer_id, name, sub
            layer_id += 1


def _local_experts(module: torch.nn.Module):
    """``(layer id, global expert index, {local name: param}, {local name: global name})`` per local expert."""
    for layer_id, name, layer in _moe_layers(module):
        prefix = f"{name}.deepspeed_moe.experts.{_EXPERTS_ATTR}." if name else f"deepspeed_moe.experts.{_EXPERTS_ATTR}."
        for local, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            index = layer.global_expert_index(local)
            params = {f"{prefix}{local}.{n}": p for n, p in expert.named_parameters()}
            names = {n: f"{prefix}{index}.{n[len(prefix) + len(str(local)) + 1:]}" for n in params}
            yield layer_id, index, params, names


def checkpoint_param_names(module: torch.nn.Module) -> Dict[torch.nn.Parameter, str]:
    """``param -> name`` as in ``named_parameters()``, with expert parameters under their global
    expert index (see the module Note). Without MoE layers: the plain names."""
    names = {p: n for n, p in module.named_parameters()}
    for _, _, params, global_names in _local_experts(module):
        for local, param in params.items():
            names[param] = global_names[local]
    return names


def expert_local_names(module: torch.nn.Module) -> List[str]:
    """The (local) state-dict names of every expert parameter of ``module``."""
    return [local for _, _, params, _ in _local_experts(module) for local in params]


def _full_value(param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(param, "ds_tensor") and hasattr(param, "_deepscale_full_access"):
        # ZeRO-3: gathered over the expert-data-parallel group (a collective of that group)
        return param._deepscale_full_access.get_full_fp32(param).to(param.dtype)
    return param.detach()


def expert_file_payloads(module: torch.nn.Module) -> Dict[str, dict]:
    """File name -> ``{global name: tensor}`` for the experts this rank writes (the first rank of
    each expert-data-parallel group). Every rank must call it (ZeRO-3 gathers)."""
    payloads = {}
    for layer_id, index, params, global_names in _local_experts(module):
        values = {global_names[n]: _full_value(p).detach().cpu().clone() for n, p in params.items()}
        groups = expert_groups_of_param(next(iter(params.values()))) if params else None
        if params and (groups is None or groups.edp_rank == 0):
            payloads[EXPERT_FILE_FORMAT.format(layer=layer_id, expert=index)] = values
    return payloads


def read_expert_files(module: torch.nn.Module, path: str, load) -> Dict[str, torch.Tensor]:
    """``{local name: tensor}`` of this rank's experts from the expert files in ``path`` (empty
    when the checkpoint has none, e.g. it was saved without MoE layers). ``load`` reads one file."""
    out = {}
    for layer_id, index, params, global_names in _local_experts(module):
        file = os.path.join(path, EXPERT_FILE_FORMAT.format(layer=layer_id, expert=index))
        if not os.path.isfile(file):
            if params:
                raise FileNotFoundError(f"{file} is missing: the checkpoint in {path} has no weights for expert "
                                        f"{index} of MoE layer {layer_id}")
            continue
        saved = load(file)
        for local in params:
            out[local] = saved[global_names[local]]
    return out


def consolidate_expert_weights(module: torch.nn.Module, state):
    """Every expert of every rank, under global names, in ``state`` (a module state dict on rank 0,
    None elsewhere); the local expert entries are replaced. Collective over the whole job
    (experts travel to every rank as objects: meant for saving, not for the training loop).
    Without MoE layers ``state`` is returned unchanged and nothing is communicated."""
    local = expert_local_names(module)
    if not local:
        return state
    from deepscale import comm as dist
    mine = {}
    for values in expert_file_payloads(module).values():
        mine.update(values)
    parts = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    if state is None:
        return None
    for name in local:
        state.pop(name, None)
    for part in parts:
        state.update(part)
    return state
