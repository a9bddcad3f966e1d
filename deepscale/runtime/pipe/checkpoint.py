"""Pipeline checkpoints: one file per layer, so the layer, not the stage count, is the unit.

Layout of a tag directory written by the pipeline engine:
  ``layer_{i:02d}-model_states.pt``  the state dict of layer ``i`` (relative keys), written by
                                     the first data-parallel replica of the stage holding it
  ``mp_rank_00_model_states.pt``     rank 0: counters, lr schedule, config, client state and a
                                     ``pipeline`` entry mapping layer index -> state-dict prefix
  ``zero_pp_rank_{n}_mp_rank_{t:02d}_optim_states.pt``
                                     the portable optimizer shards of every stage, numbered
                                     stage by stage (``t``: the tensor-parallel rank); names are
                                     global (``3.weight``), tied parameters appear only in their
                                     first stage's shard
  ``rng_states_rank{R}.pt``          each rank's RNG states

Loading reads the layer files of the local layers and gives the optimizer every shard; each
rank keeps the fragments of its own parameters. So a checkpoint saved at one pipeline degree
loads at any other, ``deepscale.utils.zero_to_fp32`` consolidates it, and a plain engine over
the same layers (e.g. ``nn.Sequential``) loads it too.

Under tensor parallelism (3D) the layer files hold whole weights (gathered over the tensor-parallel
group), so the checkpoint loads at any tensor-parallel degree, with or without pipelining; the
optimizer state (slices of the saved layout's shards) is restored at the same tensor-parallel
degree and started afresh, with a warning, at another.
"""
import contextlib
import os
from typing import Optional

import torch

from deepscale import comm as dist
from deepscale.runtime.checkpoint.engine_checkpoint import EngineState, resolve_checkpoint, save_engine_checkpoint
from deepscale.runtime.checkpoint.tag_validation import validate_checkpoint_tag
from deepscale.parallel.state_dict import full_state_dict, shard_state_dict
from deepscale.runtime.pipe.module import LayerSpec, TiedLayerSpec
from deepscale.utils.checkpoint_files import load_file
from deepscale.utils.logging import logger
from deepscale.utils.zero_to_fp32 import (CHECKPOINT_FORMAT_VERSION, MODEL_STATES_FILE, PIPELINE_LAYER_FILE,
                                          TP_OPTIM_FILE_FORMAT, iter_optimizer_shards, pipeline_module_weights)
from deepscale.version import __version__

_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def layer_prefixes(module) -> dict:
    """Layer index -> state-dict prefix, for every layer that may have state (computed from the specs)."""
    out = {}
    for index, spec in enumerate(module._layer_specs):
        if isinstance(spec, TiedLayerSpec):
            out[index] = f"tied_modules.{spec.key}."
        elif isinstance(spec, (LayerSpec, torch.nn.Module)):
            out[index] = f"{index}."
    return out


def _shards_per_stage(engine) -> int:
    opt = engine._train_opt
    if opt.basic_optimizer is None:
        return 0
    return engine.dp_world_size if opt.saves_per_rank else 1


def _payloads(engine, client_state, exclude_frozen: bool):
    """This rank's files (built on every rank; may run collectives)."""
    files = {}
    module = engine.module
    tp_size, tp_rank = engine.grid.get_model_parallel_world_size(), engine.grid.get_model_parallel_rank()
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    if engine.grid.data_parallel_id == 0:  # every tensor-parallel rank helps gather; rank 0 of them writes
        for index, (prefix, layer) in module.local_layer_modules().items():
            whole = full_state_dict(layer) if tp_size > 1 else layer.state_dict()
            if tp_rank != 0:
                continue
            state = {k: v.detach().clone() for k, v in whole.items() if not (exclude_frozen and prefix + k in frozen)}
            if state:
                files[PIPELINE_LAYER_FILE.format(index=index)] = state
    per_stage = _shards_per_stage(engine)
    if per_stage and (engine._train_opt.saves_per_rank or engine.dp_rank == 0):
        shard = engine._train_opt.state_dict()
        for key, ranks in engine.grid.tied_ranks.items():
            if ranks[0] != engine.global_rank:  # a tied duplicate: its first stage saves it
                for name in list(shard["fragments"]):
                    if name.startswith(f"tied_modules.{key}."):
                        del shard["fragments"][name]
        shard_rank = engine.dp_rank if engine._train_opt.saves_per_rank else 0
        files[TP_OPTIM_FILE_FORMAT.format(rank=engine.stage_id * per_stage + shard_rank, mp=tp_rank)] = shard
    if engine.global_rank == 0:
        files[MODEL_STATES_FILE] = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "deepscale_version": __version__,
            "module": {},
            "pipeline": {"num_stages": engine.num_stages, "num_layers": len(module._layer_specs),
                         "layer_prefixes": layer_prefixes(module)},
            "frozen_param_names": sorted(frozen),
            "excluded_frozen_param_names": sorted(frozen) if exclude_frozen else [],
            "num_optimizer_shards": per_stage * engine.num_stages,
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "counters": {name: getattr(engine, name) for name in _COUNTERS},
            "ds_config": getattr(engine._config, "raw", None),
            "dp_world_size": engine.dp_world_size,
            "tp_world_size": tp_size,
            "zero_stage": engine._config.zero_stage,
            "client_state": dict(client_state or {}),
        }
    return files


def save(engine, save_dir: str, tag=None, client_state=None, save_latest: bool = True,
         exclude_frozen_parameters: bool = False) -> bool:
    """Write the pipeline checkpoint atomically (see the module docstring); every rank must call it."""
    if client_state is not None and not isinstance(client_state, dict):
        raise TypeError(f"save_checkpoint: client_state must be a dict, got {type(client_state).__name__}")
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    validate_checkpoint_tag(tag, engine._config.checkpoint.tag_validation)
    state = EngineState(module=engine.module, dp_group=engine.dp_group,
                        payload_builder=lambda rank: _payloads(engine, client_state, exclude_frozen_parameters))
    with getattr(engine._train_opt, "module_state_context", contextlib.nullcontext)():
        save_engine_checkpoint(state, os.fspath(save_dir), tag, client_state, save_latest)
    return True


def load(engine, load_dir: str, tag=None, load_module_strict: bool = True, load_optimizer_states: bool = True,
         load_lr_scheduler_states: bool = True, load_module_only: bool = False):
    """Restore a checkpoint written at any pipeline degree, or by a plain engine over the same layers."""
    path = resolve_checkpoint(os.fspath(load_dir), tag)
    if path is None:
        return None, None
    saved = load_file(os.path.join(path, MODEL_STATES_FILE))
    whole = (pipeline_module_weights(path, saved["pipeline"]) if saved.get("pipeline") is not None
             else saved["module"])
    module = engine.module
    local = module.state_dict()
    weights = shard_state_dict(module, {k: v for k, v in whole.items() if k in local})  # whole -> this TP layout
    excluded = set(saved.get("excluded_frozen_param_names", ()))
    missing = [k for k in local if k not in weights and k not in excluded]
    if load_module_strict and missing:
        raise RuntimeError(f"checkpoint {path} does not hold the weights of {missing[:5]} (stage {engine.stage_id}); "
                           "was it saved from another model? Pass load_module_strict=False to load what matches")
    with torch.no_grad():
        module.load_state_dict(weights, strict=False)
    opt = engine._train_opt
    num_shards = int(saved.get("num_optimizer_shards", 0))
    saved_tp, tp_size = int(saved.get("tp_world_size", 1)), engine.grid.get_model_parallel_world_size()
    if saved_tp != tp_size and num_shards > 0 and not load_module_only:
        logger.warning(f"{path} was saved at tensor-parallel size {saved_tp} and is loaded at {tp_size}: module "
                       "weights are resharded, optimizer state (moments, momentum) starts afresh")
        num_shards = 0
    if not load_module_only and opt.basic_optimizer is not None and num_shards > 0:
        opt.load_shards(iter_optimizer_shards(path, num_shards, mp_rank=engine.grid.get_model_parallel_rank()),
                        load_optimizer_states=load_optimizer_states)
    else:
        opt.reseed_masters(module, weights)
    if load_module_only:
        return path, saved.get("client_state", {})
    if engine.lr_scheduler is not None and load_lr_scheduler_states and saved.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    for name in _COUNTERS:
        if name in saved.get("counters", {}):
            setattr(engine, name, int(saved["counters"][name]))
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
    engine.zero_grad()
    if dist.get_rank() == 0:
        logger.info(f"loaded pipeline checkpoint {path} (saved with "
                    f"{(saved.get('pipeline') or {}).get('num_stages', 'no')} pipeline stages)")
    return path, saved.get("client_state", {})
