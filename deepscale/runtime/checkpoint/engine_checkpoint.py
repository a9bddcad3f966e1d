"""Save and load the engine state (ZeRO stages 0, 1 and 2).

Layout of one tag directory:
  ``mp_rank_00_model_states.pt``  module weights, lr schedule, step counters, config, client
                                  state and the number of optimizer shards (written by rank 0;
                                  module weights are whole on every rank at stages 0-2). With
                                  ``exclude_frozen_parameters`` the frozen parameters are left
                                  out and listed in ``excluded_frozen_param_names``; loading
                                  keeps the model's own values for them.
  ``zero_pp_rank_{R}_mp_rank_00_optim_states.pt``
                                  optimizer shard R: fp32 masters and optimizer state of the
                                  parameter fragments rank R held, keyed by parameter name
                                  (``portable.py``); one shard at stage 0, one per rank at 1-2
  ``rng_states_rank{R}.pt``       each rank's RNG states, so dropout and sampling resume exactly

Shards are re-sliced on load, so a checkpoint saved by N ranks at any stage loads into M ranks
at any stage without a conversion step. RNG files are restored when the rank has one and
skipped with a note otherwise.
"""
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from deepscale import comm as dist
from deepscale.runtime.checkpoint.atomic import AtomicCheckpointDir, read_latest_tag, resolve_tag_dir
from deepscale.runtime.utils import get_rng_states, set_rng_states
from deepscale.utils.logging import logger
from deepscale.version import __version__

from deepscale.utils.zero_to_fp32 import (MODEL_STATES_FILE, OPTIM_FILE_FORMAT, iter_optimizer_shards,
                                          load_module_weights)

RNG_FILE_FORMAT = "rng_states_rank{rank}.pt"
CHECKPOINT_FORMAT_VERSION = 2


@dataclass
class EngineState:
    """The pieces of an engine a checkpoint carries; the engine fills and consumes it."""

    module: torch.nn.Module
    optimizer: Any = None  # the engine's training optimizer (see runtime/dp_optimizer.py)
    lr_scheduler: Any = None
    counters: Dict[str, int] = field(default_factory=dict)
    config: Optional[dict] = None
    dp_world_size: int = 1
    zero_stage: int = 0
    dp_group: Any = None


def _agree_on_staging_id() -> str:
    token = [uuid.uuid4().hex[:12]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def save_engine_checkpoint(state: EngineState, save_dir: str, tag: str, client_state: Optional[dict],
                           save_latest: bool = True, exclude_frozen_parameters: bool = False) -> str:
    """Write ``state`` under ``save_dir/tag`` atomically on every rank; returns the final path.

    ``exclude_frozen_parameters`` leaves parameters with ``requires_grad=False`` out of the
    saved module weights (default False).
    """
    rank = dist.get_rank()
    target = AtomicCheckpointDir(save_dir, str(tag), _agree_on_staging_id())
    if rank == 0:
        target.create()
    dist.barrier()
    try:
        torch.save(get_rng_states(), os.path.join(target.staging_path, RNG_FILE_FORMAT.format(rank=rank)))
        _save_optimizer_shard(state, target.staging_path, rank)
        if rank == 0:
            torch.save(_model_states(state, client_state, exclude_frozen_parameters),
                       os.path.join(target.staging_path, MODEL_STATES_FILE))
    except BaseException:
        if rank == 0:
            target.abort()
        raise
    dist.barrier()
    if rank == 0:
        target.commit(update_latest=save_latest)
        logger.info(f"saved checkpoint {target.final_path}")
    dist.barrier()
    return target.final_path


def _num_shards(state: EngineState) -> int:
    if state.optimizer is None or state.optimizer.basic_optimizer is None:
        return 0
    return state.dp_world_size if state.optimizer.saves_per_rank else 1


def _save_optimizer_shard(state: EngineState, staging_path: str, rank: int) -> None:
    # Every rank writes the shard of the fragments it owns; replicated state only from rank 0.
    if _num_shards(state) == 0 or (rank != 0 and not state.optimizer.saves_per_rank):
        return
    shard_rank = dist.get_rank(state.dp_group) if state.optimizer.saves_per_rank else 0
    torch.save(state.optimizer.state_dict(), os.path.join(staging_path, OPTIM_FILE_FORMAT.format(rank=shard_rank)))


def _model_states(state: EngineState, client_state: Optional[dict], exclude_frozen_parameters: bool = False) -> dict:
    module_state = state.module.state_dict()
    frozen = [n for n, p in state.module.named_parameters() if not p.requires_grad]
    if exclude_frozen_parameters:
        for name in frozen:
            module_state.pop(name, None)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "deepscale_version": __version__,
        "module": module_state,
        "frozen_param_names": frozen,
        "excluded_frozen_param_names": frozen if exclude_frozen_parameters else [],
        "num_optimizer_shards": _num_shards(state),
        "lr_scheduler": state.lr_scheduler.state_dict() if state.lr_scheduler is not None else None,
        "counters": dict(state.counters),
        "ds_config": state.config,
        "dp_world_size": state.dp_world_size,
        "zero_stage": state.zero_stage,
        "client_state": dict(client_state or {}),
    }


def resolve_checkpoint(load_dir: str, tag: Optional[str]) -> Optional[str]:
    """The directory to load, or None (with a warning) when there is no checkpoint."""
    if tag is None:
        tag = read_latest_tag(load_dir)
        if tag is None:
            logger.warning(f"no checkpoint to load: {os.path.join(load_dir, 'latest')} does not exist; "
                           "pass tag= to load a specific checkpoint")
            return None
    path = resolve_tag_dir(load_dir, str(tag))
    if path is None or not os.path.isfile(os.path.join(path, MODEL_STATES_FILE)):
        logger.warning(f"no checkpoint to load: {os.path.join(load_dir, str(tag))} is missing or incomplete")
        return None
    return path


def load_engine_checkpoint(state: EngineState, path: str, load_module_strict: bool = True,
                           load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                           load_module_only: bool = False) -> Tuple[dict, dict]:
    """Restore ``state`` from the tag directory ``path``; returns ``(counters, client_state)``."""
    saved = torch.load(os.path.join(path, MODEL_STATES_FILE), map_location="cpu", weights_only=False)
    load_module_weights(state.module, saved["module"], saved, load_module_strict, where=path,
                        strict_name="load_module_strict")
    if load_module_only:
        _reseed_masters(state, saved["module"])
        return {}, saved.get("client_state", {})
    if state.optimizer is not None:
        if saved.get("format_version", 1) < 2:
            raise ValueError(f"{path} was written by an older deepscale (checkpoint format "
                             f"{saved.get('format_version', 1)}); this version reads format "
                             f"{CHECKPOINT_FORMAT_VERSION}")
        if saved.get("num_optimizer_shards", 0) > 0 and state.optimizer.basic_optimizer is not None:
            state.optimizer.load_shards(iter_optimizer_shards(path, saved["num_optimizer_shards"]),
                                        load_optimizer_states=load_optimizer_states)
        else:
            _reseed_masters(state, saved["module"])
    if state.lr_scheduler is not None and load_lr_scheduler_states and saved.get("lr_scheduler") is not None:
        state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    _load_rng(path, saved.get("dp_world_size"))
    return saved.get("counters", {}), saved.get("client_state", {})


def _reseed_masters(state: EngineState, module_sd: dict) -> None:
    if state.optimizer is not None:
        state.optimizer.reseed_masters(state.module, module_sd)


def _load_rng(path: str, saved_world_size: Optional[int]) -> None:
    rng_path = os.path.join(path, RNG_FILE_FORMAT.format(rank=dist.get_rank()))
    if os.path.isfile(rng_path):
        set_rng_states(torch.load(rng_path, map_location="cpu", weights_only=False))
    elif dist.get_rank() == 0:
        logger.info(f"checkpoint was saved by {saved_world_size} ranks: RNG states of ranks without a saved "
                    "state are left as they are")
