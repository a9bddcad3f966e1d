"""Save and load the data-parallel (ZeRO stage 0) engine state.

Layout of one tag directory:
  ``mp_rank_00_model_states.pt``  module weights, optimizer (with fp32 masters), lr schedule,
                                  step counters, config and client state (written by rank 0;
                                  every rank holds the same replica at stage 0)
  ``rng_states_rank{R}.pt``       each rank's RNG states, so dropout and sampling resume exactly

Because stage-0 state is replicated, a checkpoint loads at any data-parallel world size; RNG
files are restored when the rank has one and skipped with a note otherwise.
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

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
RNG_FILE_FORMAT = "rng_states_rank{rank}.pt"
CHECKPOINT_FORMAT_VERSION = 1


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


def _agree_on_staging_id() -> str:
    token = [uuid.uuid4().hex[:12]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def save_engine_checkpoint(state: EngineState, save_dir: str, tag: str, client_state: Optional[dict],
                           save_latest: bool = True) -> str:
    """Write ``state`` under ``save_dir/tag`` atomically on every rank; returns the final path."""
    rank = dist.get_rank()
    target = AtomicCheckpointDir(save_dir, str(tag), _agree_on_staging_id())
    if rank == 0:
        target.create()
    dist.barrier()
    try:
        torch.save(get_rng_states(), os.path.join(target.staging_path, RNG_FILE_FORMAT.format(rank=rank)))
        if rank == 0:
            torch.save(_model_states(state, client_state), os.path.join(target.staging_path, MODEL_STATES_FILE))
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


def _model_states(state: EngineState, client_state: Optional[dict]) -> dict:
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "deepscale_version": __version__,
        "module": state.module.state_dict(),
        "optimizer": state.optimizer.state_dict() if state.optimizer is not None else None,
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
    state.module.load_state_dict(saved["module"], strict=load_module_strict)
    if load_module_only:
        _reseed_masters(state, saved["module"])
        return {}, saved.get("client_state", {})
    if state.optimizer is not None:
        if saved.get("optimizer") is not None:
            state.optimizer.load_state_dict(saved["optimizer"], load_optimizer_states=load_optimizer_states)
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
