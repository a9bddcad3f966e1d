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
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from deepscale import comm as dist
from deepscale.runtime.checkpoint.atomic import (AtomicCheckpointDir, read_latest_tag, remove_stale_staging,
                                                 resolve_tag_dir)
from deepscale.runtime.checkpoint.deepspeed_format import (has_model_states, is_deepspeed_checkpoint,
                                                           read_deepspeed_checkpoint, read_latest_universal_tag)
from deepscale.runtime.checkpoint.deepspeed_pickle import load_ds_file
from deepscale.runtime.checkpoint.expert_files import (checkpoint_param_names, expert_file_payloads,
                                                       expert_local_names, read_expert_files)
from deepscale.runtime.utils import get_rng_states, set_rng_states
from deepscale.utils.checkpoint_files import load_file, save_file
from deepscale.utils.logging import logger
from deepscale.version import __version__

from deepscale.parallel.state_dict import shard_state_dict
from deepscale.utils.zero_to_fp32 import (CHECKPOINT_FORMAT_VERSION, MODEL_STATES_FILE, OPTIM_FILE_FORMAT,
                                          TP_OPTIM_FILE_FORMAT, iter_optimizer_shards, load_module_weights, pipeline_module_weights)

RNG_FILE_FORMAT = "rng_states_rank{rank}.pt"


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
    # rank -> {file name: object}: replaces the default files (the pipeline engine writes per-layer files).
    payload_builder: Optional[Callable[[int], Dict[str, Any]]] = None
    # Tensor parallelism: whole module weights to save (gathered on every rank beforehand) and
    # this rank's place; optimizer shards are written per tensor-parallel rank.
    module_state: Optional[dict] = None
    tp_size: int = 1
    tp_rank: int = 0


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed on at least one rank; raised on every rank.

    Nothing was published: ``latest`` and the previous checkpoints are unchanged and the
    staging directory is removed. ``failures`` maps each failing rank to its error text.
    """

    def __init__(self, message: str, failures: Dict[int, str]):
        super().__init__(message)
        self.failures = dict(failures)


def _agree_on_staging_id() -> str:
    token = [uuid.uuid4().hex[:12]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _failures_on_any_rank(error: Optional[BaseException]) -> Dict[int, str]:
    """Every rank's error text from one step of the save (empty when all succeeded).

    Note: why every rank joins. A rank whose write failed still calls this (its error is
    caught, not raised), so the others learn of the failure from one small collective instead
    of waiting at a barrier until the process-group timeout; all ranks then raise together.
    """
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {} if mine is None else {dist.get_rank(): mine}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {rank: text for rank, text in enumerate(gathered) if text is not None}


def _raise_if_failed(failures: Dict[int, str], what: str, target: AtomicCheckpointDir, error) -> None:
    if not failures:
        return
    if dist.get_rank() == 0:
        target.abort()
    detail = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(failures.items()))
    message = (f"checkpoint {target.final_path} was not saved: {what} failed on rank(s) "
               f"{', '.join(map(str, sorted(failures)))} ({detail}). The previous checkpoints and "
               f"{os.path.join(target.save_dir, 'latest')} are unchanged.")
    raise CheckpointSaveError(message, failures) from error


def save_engine_checkpoint(state: EngineState, save_dir: str, tag: str, client_state: Optional[dict],
                           save_latest: bool = True, exclude_frozen_parameters: bool = False) -> str:
    """Write ``state`` under ``save_dir/tag`` atomically on every rank; returns the final path.

    Every rank writes its files into a staging directory; the ranks then agree that all
    writes succeeded before rank 0 publishes the directory and moves ``latest``.
    ``exclude_frozen_parameters`` leaves parameters with ``requires_grad=False`` out of the
    saved module weights (default False).

    Raises:
        CheckpointSaveError: on every rank when any rank failed (names the ranks and errors).
    """
    rank = dist.get_rank()
    target = AtomicCheckpointDir(save_dir, str(tag), _agree_on_staging_id())
    error = None
    if rank == 0:
        try:
            target.create()
        except Exception as exc:  # every rank must still reach the exchange below
            error = exc
    _raise_if_failed(_failures_on_any_rank(error), "creating the staging directory", target, error)
    try:
        # Built on every rank before any file is written: building may run collectives (a
        # sharded optimizer's state), which must not be skipped by a rank whose write failed.
        payloads = _payloads(state, client_state, rank, exclude_frozen_parameters)
        for name, obj in payloads.items():
            save_file(obj, os.path.join(target.staging_path, name))
    except Exception as exc:
        error = exc
    _raise_if_failed(_failures_on_any_rank(error), "writing the checkpoint files", target, error)
    if rank == 0:
        try:
            target.commit(update_latest=save_latest)
            logger.info(f"saved checkpoint {target.final_path}")
        except Exception as exc:
            error = exc
    _raise_if_failed(_failures_on_any_rank(error), "publishing the checkpoint", target, error)
    return target.final_path


def _payloads(state: EngineState, client_state: Optional[dict], rank: int,
              exclude_frozen_parameters: bool = False) -> Dict[str, Any]:
    """File name -> object for the files this rank writes."""
    if state.payload_builder is not None:
        return {RNG_FILE_FORMAT.format(rank=rank): get_rng_states(), **state.payload_builder(rank)}
    payloads = {RNG_FILE_FORMAT.format(rank=rank): get_rng_states()}
    shard = _optimizer_shard(state, rank)
    if shard is not None:
        payloads[shard[0]] = shard[1]
    payloads.update(expert_file_payloads(state.module))  # collective under ZeRO-3
    if rank == 0:
        payloads[MODEL_STATES_FILE] = _model_states(state, client_state, exclude_frozen_parameters)
    return payloads


def _num_shards(state: EngineState) -> int:
    if state.optimizer is None or state.optimizer.basic_optimizer is None:
        return 0
    return state.dp_world_size if state.optimizer.saves_per_rank else 1


def _optimizer_shard(state: EngineState, rank: int) -> Optional[Tuple[str, dict]]:
    # Every rank writes the shard of the fragments it owns; replicated state only from rank 0.
    # Under tensor parallelism each tensor-parallel rank's data-parallel rank 0 writes its own set.
    first = dist.get_rank(state.dp_group) == 0 if state.tp_size > 1 else rank == 0
    if _num_shards(state) == 0 or (not first and not state.optimizer.saves_per_rank):
        return None
    shard_rank = dist.get_rank(state.dp_group) if state.optimizer.saves_per_rank else 0
    if state.tp_size > 1:
        return TP_OPTIM_FILE_FORMAT.format(rank=shard_rank, mp=state.tp_rank), state.optimizer.state_dict()
    return OPTIM_FILE_FORMAT.format(rank=shard_rank), state.optimizer.state_dict()


def _model_states(state: EngineState, client_state: Optional[dict], exclude_frozen_parameters: bool = False) -> dict:
    module_state = state.module_state if state.module_state is not None else state.module.state_dict()
    for name in expert_local_names(state.module):  # experts have files of their own
        module_state.pop(name, None)
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
        "tp_world_size": state.tp_size,
        "zero_stage": state.zero_stage,
        "client_state": dict(client_state or {}),
    }


def resolve_checkpoint(load_dir: str, tag: Optional[str]) -> Optional[str]:
    """The directory to load, or None (with a warning) when there is no checkpoint."""
    if dist.get_rank() == 0:
        remove_stale_staging(load_dir, restore_set_aside=False)  # leftovers of a crashed save
    if tag is None:
        tag = read_latest_tag(load_dir) or read_latest_universal_tag(load_dir)
        if tag is None:
            logger.warning(f"no checkpoint to load: {os.path.join(load_dir, 'latest')} does not exist; "
                           "pass tag= to load a specific checkpoint")
            return None
    path = resolve_tag_dir(load_dir, str(tag))
    if path is None or not has_model_states(path):  # deepscale's file name, or DeepSpeed's ZeRO-3 ones
        logger.warning(f"no checkpoint to load: {os.path.join(load_dir, str(tag))} is missing or incomplete")
        return None
    return path


def load_engine_checkpoint(state: EngineState, path: str, load_module_strict: bool = True,
                           load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                           load_module_only: bool = False) -> Tuple[dict, dict]:
    """Restore ``state`` from the tag directory ``path``; returns ``(counters, client_state)``."""
    saved, ds_shards = _read_model_states(path)
    module_sd, reseed_sd = _with_expert_weights(state.module, saved["module"], path)
    if reseed_sd is module_sd:  # no expert files: tensor-parallel layouts reshard the whole weights
        module_sd = reseed_sd = shard_state_dict(state.module, module_sd)
    else:
        module_sd = shard_state_dict(state.module, module_sd)
    load_module_weights(state.module, module_sd, saved, load_module_strict, where=path,
                        strict_name="load_module_strict")
    if load_module_only:
        _reseed_masters(state, reseed_sd)
        return {}, saved.get("client_state", {})
    if state.optimizer is not None:
        if saved.get("format_version", 1) < 2:
            raise ValueError(f"{path} was written by an older deepscale (checkpoint format "
                             f"{saved.get('format_version', 1)}); this version reads format "
                             f"{CHECKPOINT_FORMAT_VERSION}")
        saved_tp = int(saved.get("tp_world_size", 1))
        if saved_tp != state.tp_size and saved.get("num_optimizer_shards", 0) > 0:
            # Optimizer shards hold slices of the saved layout's shards; the whole weights move.
            logger.warning(f"{path} was saved at tensor-parallel size {saved_tp} and is loaded at {state.tp_size}: "
                           "module weights are resharded, optimizer state (moments, momentum) starts afresh")
            _reseed_masters(state, module_sd)
        elif saved.get("num_optimizer_shards", 0) > 0 and state.optimizer.basic_optimizer is not None:
            shards = ds_shards() if ds_shards else iter_optimizer_shards(path, saved["num_optimizer_shards"],
                                                                         mp_rank=state.tp_rank)
            state.optimizer.load_shards(shards,
                                        load_optimizer_states=load_optimizer_states)
        else:
            _reseed_masters(state, reseed_sd)
    if state.lr_scheduler is not None and load_lr_scheduler_states and saved.get("lr_scheduler") is not None:
        state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    _load_rng(path, saved.get("dp_world_size"))
    return saved.get("counters", {}), saved.get("client_state", {})


def _read_model_states(path: str):
    """deepscale's model states of ``path`` and, for a DeepSpeed checkpoint, its shard reader."""
    model_states_file = os.path.join(path, MODEL_STATES_FILE)
    # DeepSpeed pickles some of its own classes; this load tolerates them without DeepSpeed.
    saved = load_ds_file(model_states_file) if os.path.isfile(model_states_file) else None
    if saved is None or is_deepspeed_checkpoint(path, saved):
        if dist.get_rank() == 0:
            logger.info(f"{path} was written by DeepSpeed: converting it to deepscale's portable layout")
        return read_deepspeed_checkpoint(path, saved)
    if saved.get("pipeline") is not None:  # saved by the pipeline engine: weights are in per-layer files
        saved = {**saved, "module": pipeline_module_weights(path, saved["pipeline"])}
    return saved, None


def _with_expert_weights(module: torch.nn.Module, module_sd: dict, path: str) -> Tuple[dict, dict]:
    """``(weights to load, weights to reseed masters from)``: the dense weights plus this rank's
    experts read from their files (``expert_files.py``) under local names; the second also
    under global names, the names optimizer fragments use."""
    local = expert_local_names(module)
    if not local or all(name in module_sd for name in local):
        return module_sd, module_sd
    experts = read_expert_files(module, path, load_file)
    merged = {**module_sd, **experts}
    names = checkpoint_param_names(module)
    by_local = {n: p for n, p in module.named_parameters()}
    aliases = {names[by_local[n]]: value for n, value in experts.items()}
    return merged, {**merged, **aliases}


def _reseed_masters(state: EngineState, module_sd: dict) -> None:
    if state.optimizer is not None:
        state.optimizer.reseed_masters(state.module, module_sd)


def _load_rng(path: str, saved_world_size: Optional[int]) -> None:
    rng_path = os.path.join(path, RNG_FILE_FORMAT.format(rank=dist.get_rank()))
    if os.path.isfile(rng_path):
        set_rng_states(load_file(rng_path))
    elif dist.get_rank() == 0:
        logger.info(f"checkpoint was saved by {saved_world_size} ranks: RNG states of ranks without a saved "
                    "state are left as they are")
