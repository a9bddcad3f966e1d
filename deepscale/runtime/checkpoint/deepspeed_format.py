"""Read checkpoints written by DeepSpeed 0.x, so a run can switch to deepscale mid-training.

Note: the DeepSpeed layouts, as found in the files (DeepSpeed 0.19). A tag directory holds

* ``mp_rank_00_model_states.pt`` (ZeRO stages 0-2) or one ``zero_pp_rank_{R}_mp_rank_00_model_states.pt``
  per rank (stage 3, whose ``module`` entries of parameters are empty): keys ``module``,
  ``buffer_names``, ``param_shapes`` (one ordered name -> shape dict per optimizer param group,
  stages 1-3), ``optimizer`` (the whole torch optimizer state at stage 0), ``lr_scheduler``,
  ``global_steps``, ``global_samples``, ``skipped_steps``, ``dp_world_size``, ``ds_config``,
  ``ds_version``;
* ``zero_pp_rank_{R}_mp_rank_00_optim_states.pt`` (stages 1-3), whose ``optimizer_state_dict`` holds
  ``zero_stage``, ``loss_scaler``, ``partition_count`` and

  - stages 1-2: ``single_partition_of_fp32_groups`` (rank R's slice of each group's flat fp32
    vector, the groups' parameters laid end to end in ``param_shapes`` order, the last rank's
    slice padded), ``base_optimizer_state`` (the torch state of those slices) and
    ``param_slice_mappings`` (name -> where each parameter's piece sits in rank R's slice);
  - stage 3: ``fp32_flat_groups`` (per group, rank R's part of every parameter in order; each
    parameter is split into ``ceil(numel / world_size)``-element parts, the last one padded) and
    ``optimizer_state_dict`` (the torch state of those groups);
* or, after DeepSpeed's ``ds_to_universal``, a ``zero/`` folder with one sub-folder per parameter
  (``fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``) and ``zero/optimizer_state.pt``
  (param groups, loss scaler), next to the model-states files above.

Every layout is converted into deepscale's portable shards (``portable.py``), one per DeepSpeed
rank (a single one for stage 0 and the universal layout), which the ordinary load path re-slices
for any world size and ZeRO stage. The files are unpickled without DeepSpeed
(``deepspeed_pickle.py``).
"""
import glob
import os
import re
import types
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from deepscale.ops.cpu_optimizer_base import step_tensor as _step_tensor  # DeepSpeed's FusedAdam keeps an int
from deepscale.runtime.checkpoint.atomic import read_latest_tag
from deepscale.runtime.checkpoint.deepspeed_pickle import as_int, fragment_address, load_ds_file
from deepscale.utils.zero_to_fp32 import CHECKPOINT_FORMAT_VERSION, MODEL_STATES_FILE
from deepscale.runtime.checkpoint.portable import FORMAT_NAME, FORMAT_VERSION

DS_MODEL_STATES_FILE = MODEL_STATES_FILE  # the same name in both layouts
DS_ZERO3_MODEL_STATES_GLOB = "zero_pp_rank_*_mp_rank_00_model_states.pt"
DS_OPTIM_FILE_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
UNIVERSAL_DIR = "zero"
UNIVERSAL_OPTIM_FILE = "optimizer_state.pt"
LATEST_UNIVERSAL_FILE = "latest_universal"
_UNIVERSAL_NON_STATE_FILES = ("fp32", "step")  # zero/<name>/*.pt that are not elementwise optimizer state
# Param-group entries that are not training state: the loading optimizer's own implementation
# choices (torch's fused/foreach paths) and step counters, which travel as optimizer state.
NOT_HYPERPARAMETERS = ("params", "step", "foreach", "fused", "capturable", "differentiable")


def _model_states_files(tag_dir: str) -> List[str]:
    single = os.path.join(tag_dir, DS_MODEL_STATES_FILE)
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(tag_dir, DS_ZERO3_MODEL_STATES_GLOB)), key=_rank_of)


def _rank_of(path: str) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path))
    return int(found.group(1)) if found else 0


def has_model_states(tag_dir: str) -> bool:
    """True when ``tag_dir`` holds DeepSpeed model states (incl. ZeRO-3's per-rank ones)."""
    return bool(_model_states_files(tag_dir))


def is_deepspeed_checkpoint(tag_dir: str, model_states: Optional[dict] = None) -> bool:
    """True when ``tag_dir`` was written by DeepSpeed (not by deepscale).

    Args:
        tag_dir: a checkpoint tag directory.
        model_states: its already loaded ``mp_rank_00_model_states.pt``, if the caller has it.
    """
    if model_states is None:
        files = _model_states_files(tag_dir)
        if not files:
            return False
        if os.path.basename(files[0]) != DS_MODEL_STATES_FILE:
            return True  # deepscale never writes per-rank model states
        model_states = load_ds_file(files[0])
    return isinstance(model_states, dict) and "ds_version" in model_states and "format_version" not in model_states


def _optim_files(tag_dir: str) -> List[str]:
    found = [(int(m.group(1)), name) for name in os.listdir(tag_dir) for m in [DS_OPTIM_FILE_RE.match(name)] if m]
    return [os.path.join(tag_dir, name) for _, name in sorted(found)]


def _group_hypers(param_groups: List[dict], names: List[List[str]]) -> List[dict]:
    if len(param_groups) != len(names):
        raise ValueError(f"DeepSpeed checkpoint: {len(param_groups)} optimizer param groups but parameter names for "
                         f"{len(names)}")
    return [{**{k: v for k, v in group.items() if k not in NOT_HYPERPARAMETERS}, "names": list(group_names)}
            for group, group_names in zip(param_groups, names)]


def _group_scalars(torch_state: dict, num_groups: int, index_of_group: Callable[[int], int]) -> List[dict]:
    scalars: List[dict] = [{} for _ in range(num_groups)]
    for index, entry in torch_state.get("state", {}).items():
        group = index_of_group(int(index))
        for key, value in entry.items():
            if not (torch.is_tensor(value) and value.dim() > 0) and key not in scalars[group]:
                scalars[group][key] = _step_tensor(value) if key == "step" else \
                    value.detach().clone() if torch.is_tensor(value) else value
    for group, hyper in zip(scalars, torch_state.get("param_groups", [])):
        if "step" not in group and hyper.get("step"):  # optimizers that count steps per group
            group["step"] = _step_tensor(hyper["step"])
    return scalars


def _loss_scaler_state(scaler) -> Optional[dict]:
    """deepscale's dynamic loss-scaler state from DeepSpeed's, or None for a static scale."""
    if scaler is None or not getattr(scaler, "dynamic", False):
        return None
    state = {key: getattr(scaler, key) for key in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis",
                                                    "scale_factor", "scale_window", "min_scale", "delayed_shift",
                                                    "consecutive_hysteresis") if hasattr(scaler, key)}
    if state.get("last_overflow_iter") is None:
        state["last_overflow_iter"] = -1
    return state


def _shard(zero_stage: int, fragments: Dict[str, dict], scalars: List[dict], groups: List[dict],
           loss_scaler: Optional[dict]) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "zero_stage": zero_stage, "fragments": fragments,
            "group_scalars": scalars, "param_groups": groups, "loss_scaler": loss_scaler}


def _fragment(shape, start: int, fp32: torch.Tensor, states: Dict[str, torch.Tensor]) -> dict:
    return {"shape": list(shape), "start": int(start), "fp32": fp32.detach().float().clone(),
            "state": {key: value.detach().clone() for key, value in states.items()}}


def _elementwise(entry: dict, like: torch.Tensor) -> Dict[str, torch.Tensor]:
    # DeepSpeed strips the padding from the saved fp32 slice but not from the optimizer state.
    return {key: value.reshape(-1) for key, value in entry.items()
            if torch.is_tensor(value) and value.dim() > 0 and value.numel() >= like.numel()}


def _group_of_index(param_groups: List[dict]) -> Callable[[int], int]:
    owner = {int(index): g for g, group in enumerate(param_groups) for index in group.get("params", [])}
    return lambda index: owner.get(index, 0)


def _base_state(osd: dict) -> dict:
    base = osd["base_optimizer_state"]
    if isinstance(base, list):  # older DeepSpeed: one torch state per group, no param_groups
        return {"state": dict(enumerate(base)), "param_groups": [{"params": [g]} for g in range(len(base))]}
    return base


# --- stage 0: the torch optimizer state lives in the model-states file ------------------------
def _distinct_parameter_names(module_state: dict, buffers: set) -> List[str]:
    """Parameter names in ``model.parameters()`` order: a tied weight appears in the state dict
    under every name but is one parameter (the first name), as ``parameters()`` yields it once."""
    seen, names = set(), []
    for name, tensor in module_state.items():
        if name in buffers:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _stage0_shards(ms: dict) -> Iterator[dict]:
    torch_state = ms.get("optimizer")
    if isinstance(torch_state, dict) and "fp32_groups_flat" in torch_state:
        yield _stage0_flat_shard(ms, torch_state)
        return
    if not isinstance(torch_state, dict) or "param_groups" not in torch_state or "state" not in torch_state:
        raise ValueError("DeepSpeed checkpoint without ZeRO: its 'optimizer' entry is neither a torch optimizer "
                         "state nor DeepSpeed's fp16/bf16 optimizer state; load it with "
                         "load_optimizer_states=False to take the weights only")
    param_names = _distinct_parameter_names(ms["module"], set(ms.get("buffer_names") or ()))
    groups = torch_state["param_groups"]
    fragments, names = {}, []
    for group in groups:
        names.append([])
        for index in group["params"]:
            if index >= len(param_names):
                raise ValueError(f"DeepSpeed checkpoint: optimizer parameter {index} has no module parameter; only "
                                 "optimizers over model.parameters() in order can be mapped to names")
            name = param_names[index]
            weight = ms["module"][name]
            states = _elementwise(torch_state["state"].get(index, {}), weight)
            if any(value.numel() != weight.numel() for value in states.values()):
                raise ValueError(f"DeepSpeed checkpoint: the optimizer state of parameter {index} does not match the "
                                 f"shape of {name!r}; only optimizers over model.parameters() in order can be mapped")
            fragments[name] = _fragment(weight.shape, 0, weight.reshape(-1), states)
            names[-1].append(name)
    yield _shard(0, fragments, _group_scalars(torch_state, len(groups), _group_of_index(groups)),
                 _group_hypers(groups, names), None)


def _stage0_flat_shard(ms: dict, fp16_state: dict) -> dict:
    """fp16/bf16 without ZeRO (DeepSpeed's FP16_Optimizer): one flat fp32 vector per param group
    holding the group's parameters end to end; supported for one param group, whose order is
    ``model.parameters()`` (with several, the file does not say which parameter is in which)."""
    flats = fp16_state["fp32_groups_flat"]
    torch_state = fp16_state["optimizer_state_dict"]
    param_names = _distinct_parameter_names(ms["module"], set(ms.get("buffer_names") or ()))
    shapes = [ms["module"][name].shape for name in param_names]
    if len(flats) != 1 or flats[0].numel() != sum(int(shape.numel()) for shape in shapes):
        raise ValueError(f"DeepSpeed fp16/bf16 checkpoint without ZeRO: {len(flats)} flat fp32 groups of "
                         f"{[int(f.numel()) for f in flats]} elements do not map onto the module's parameters "
                         f"({sum(int(shape.numel()) for shape in shapes)} elements); only one param group over "
                         "model.parameters() is readable. Load it with load_optimizer_states=False")
    states = _elementwise(torch_state["state"].get(0, {}), flats[0])
    fragments, offset = {}, 0
    for name, shape in zip(param_names, shapes):
        piece = slice(offset, offset + int(shape.numel()))
        fragments[name] = _fragment(shape, 0, flats[0][piece], {k: v[piece] for k, v in states.items()})
        offset = piece.stop
    groups = torch_state["param_groups"]
    return _shard(0, fragments, _group_scalars(torch_state, len(groups), _group_of_index(groups)),
                  _group_hypers(groups, [param_names]), None)


# --- stages 1 and 2: one flat fp32 vector per group, cut into equal slices --------------------
def _stage12_shards(files: List[str], param_shapes: List[dict]) -> Iterator[dict]:
    consumed: Dict[str, int] = {}  # elements of each parameter held by earlier ranks
    names = [list(shapes) for shapes in param_shapes]
    shapes = {name: shape for group in param_shapes for name, shape in group.items()}
    for path in files:
        osd = load_ds_file(path)["optimizer_state_dict"]
        base = _base_state(osd)
        partitions = osd["single_partition_of_fp32_groups"]
        mappings = osd.get("param_slice_mappings") or _computed_mappings(partitions, param_shapes, consumed)
        fragments = {}
        for group, (flat, mapping) in enumerate(zip(partitions, mappings)):
            states = _elementwise(base["state"].get(group, {}), flat)
            for name, address in mapping.items():
                numel, start = fragment_address(address)
                if numel == 0:
                    continue
                piece = slice(start, start + numel)
                fragments[name] = _fragment(shapes[name], consumed.get(name, 0), flat[piece],
                                            {k: v[piece] for k, v in states.items()})
                consumed[name] = consumed.get(name, 0) + numel
        groups = base["param_groups"]
        yield _shard(as_int(osd.get("zero_stage", 2)), fragments,
                     _group_scalars(base, len(groups), _group_of_index(groups)), _group_hypers(groups, names),
                     _loss_scaler_state(osd.get("loss_scaler")))


def _computed_mappings(partitions, param_shapes: List[dict], consumed: Dict[str, int]) -> List[dict]:
    """Where each parameter sits in this rank's slices, for files without ``param_slice_mappings``:
    parameters are laid end to end from offset 0 of the group's flat vector."""
    mappings = []
    for flat, shapes in zip(partitions, param_shapes):
        rank_start = sum(consumed.get(name, 0) for name in shapes)  # the earlier ranks' slices
        offset, mapping = 0, {}
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            lo, hi = max(offset, rank_start), min(offset + numel, rank_start + flat.numel())
            if lo < hi:
                mapping[name] = types.SimpleNamespace(numel=hi - lo, start=lo - rank_start)
            offset += numel
        mappings.append(mapping)
    return mappings


# --- stage 3: every parameter cut into world_size equal parts ---------------------------------
def _stage3_parts(files: List[str], param_shapes: List[dict]) -> Iterator[Tuple[dict, dict]]:
    """Per rank: (fragments, the rank's ZeRO-3 optimizer state dict)."""
    world_size = len(files)
    for rank, path in enumerate(files):
        osd = load_ds_file(path)["optimizer_state_dict"]
        torch_state = osd["optimizer_state_dict"]
        flats = osd["fp32_flat_groups"]
        if len(flats) != len(param_shapes):
            raise ValueError(f"DeepSpeed ZeRO-3 checkpoint {path}: {len(flats)} flat fp32 groups but parameter shapes "
                             f"for {len(param_shapes)}")
        fragments = {}
        for group, (flat, shapes) in enumerate(zip(flats, param_shapes)):
            states = _elementwise(torch_state["state"].get(group, {}), flat)
            offset = 0
            for name, shape in shapes.items():
                numel = int(torch.Size(shape).numel())
                part = -(-numel // world_size)
                start = rank * part
                held = max(0, min(part, numel - start))
                if held:
                    piece = slice(offset, offset + held)
                    fragments[name] = _fragment(shape, start, flat[piece], {k: v[piece] for k, v in states.items()})
                offset += part
        yield fragments, osd


def _stage3_shards(files: List[str], param_shapes: List[dict]) -> Iterator[dict]:
    names = [list(shapes) for shapes in param_shapes]
    for fragments, osd in _stage3_parts(files, param_shapes):
        torch_state = osd["optimizer_state_dict"]
        groups = torch_state["param_groups"]
        yield _shard(3, fragments, _group_scalars(torch_state, len(groups), _group_of_index(groups)),
                     _group_hypers(groups, _names_per_group(names, groups)), _loss_scaler_state(osd.get("loss_scaler")))


def _names_per_group(names: List[List[str]], groups: List[dict]) -> List[List[str]]:
    """Parameter names of each torch param group; ZeRO-3 sub-groups (flat groups) are merged
    into the param group whose ``params`` lists their index."""
    if len(names) == len(groups):
        return names
    group_of = _group_of_index(groups)
    merged: List[List[str]] = [[] for _ in groups]
    for sub_group, sub_names in enumerate(names):
        merged[group_of(sub_group)].extend(sub_names)
    return merged


# --- the universal layout: one folder per parameter --------------------------------------------
def _universal_tensor(path: str) -> torch.Tensor:
    value = load_ds_file(path)
    return value["param"] if isinstance(value, dict) else value


def _universal_shards(tag_dir: str, param_shapes: List[dict]) -> Iterator[dict]:
    zero_dir = os.path.join(tag_dir, UNIVERSAL_DIR)
    common = load_ds_file(os.path.join(zero_dir, UNIVERSAL_OPTIM_FILE))
    groups = common.get("param_groups") or common.get("optimizer_state_dict", {}).get("param_groups")
    names = _names_per_group([list(shapes) for shapes in param_shapes], groups)
    # Scalar state (Adam's step) is in step.pt files after stages 1-2, in the common file after stage 3.
    inner = common.get("optimizer_state_dict") or {}
    scalars = _group_scalars(inner, len(groups), _group_of_index(groups)) if inner.get("state") \
        else [{} for _ in groups]
    fragments = {}
    for group, group_names in enumerate(names):
        for name in group_names:
            folder = os.path.join(zero_dir, name)
            fp32 = _universal_tensor(os.path.join(folder, "fp32.pt")).detach()
            states = {os.path.splitext(f)[0]: _universal_tensor(os.path.join(folder, f)).reshape(-1)
                      for f in sorted(os.listdir(folder))
                      if f.endswith(".pt") and os.path.splitext(f)[0] not in _UNIVERSAL_NON_STATE_FILES}
            if os.path.isfile(os.path.join(folder, "step.pt")) and "step" not in scalars[group]:
                scalars[group]["step"] = _step_tensor(_universal_tensor(os.path.join(folder, "step.pt")))
            fragments[name] = _fragment(fp32.shape, 0, fp32.reshape(-1), states)
    yield _shard(as_int(common.get("zero_stage", 0)), fragments, scalars, _group_hypers(groups, names),
                 _loss_scaler_state(common.get("loss_scaler")))


def read_latest_universal_tag(load_dir: str) -> Optional[str]:
    """The tag named by DeepSpeed's ``latest_universal`` file, or None when there is none."""
    return read_latest_tag(load_dir, LATEST_UNIVERSAL_FILE)


def is_universal(tag_dir: str) -> bool:
    """True when ``tag_dir`` holds DeepSpeed's universal layout (``zero/optimizer_state.pt``)."""
    return os.path.isfile(os.path.join(tag_dir, UNIVERSAL_DIR, UNIVERSAL_OPTIM_FILE))


# --- putting it together -----------------------------------------------------------------------
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
            "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info"}


def _full_module_from_shards(ms: dict, shards: Callable[[], Iterator[dict]]) -> Dict[str, torch.Tensor]:
    """The module state dict of a ZeRO-3 checkpoint, whose model-states hold no parameter data:
    parameters are assembled from the fp32 fragments, buffers come from the model states."""
    if ms.get("frozen_param_shapes"):
        raise ValueError("DeepSpeed ZeRO-3 checkpoint with frozen parameters: their fragments are not read by "
                         "deepscale yet; unfreeze them in the run that saves, or load with load_module_strict=False")
    full: Dict[str, torch.Tensor] = {}
    for shard in shards():
        for name, entry in shard["fragments"].items():
            numel = int(torch.Size(entry["shape"]).numel())
            target = full.setdefault(name, torch.zeros(numel, dtype=torch.float32))
            target[entry["start"]:entry["start"] + entry["fp32"].numel()].copy_(entry["fp32"])
    module = {}
    for name, value in ms["module"].items():
        if name in full:
            module[name] = full.pop(name).view(_param_shape(ms, name))
        else:
            module[name] = value
    return module


def _param_shape(ms: dict, name: str) -> torch.Size:
    """The shape of trained parameter ``name`` recorded in DeepSpeed model states."""
    for shapes in ms.get("param_shapes") or ():
        if name in shapes:
            return torch.Size(shapes[name])
    raise KeyError(name)


def read_deepspeed_checkpoint(tag_dir: str, model_states: Optional[dict] = None
                              ) -> Tuple[dict, Callable[[], Iterator[dict]]]:
    """Read a DeepSpeed tag directory as deepscale model states plus portable optimizer shards.

    Args:
        tag_dir: a DeepSpeed checkpoint tag directory (ZeRO stage 0-3 files, or the universal layout).
        model_states: its first model-states file, if the caller has already loaded it.

    Returns:
        ``(model_states, shards)``: ``model_states`` in the layout of deepscale's
        ``mp_rank_00_model_states.pt`` (module weights, lr scheduler, counters, DeepSpeed's config
        and the client state DeepSpeed stored beside them); ``shards()`` yields the optimizer
        state as portable shards, one at a time (``portable.import_shards`` consumes them).

    Raises:
        ValueError: a layout deepscale cannot read (e.g. fp16 at stage 0), with the reason.
        FileNotFoundError: no DeepSpeed model states in ``tag_dir``.
    """
    files = _model_states_files(tag_dir)
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states ({DS_MODEL_STATES_FILE} or "
                                f"{DS_ZERO3_MODEL_STATES_GLOB})")
    universal = is_universal(tag_dir)
    if not universal and glob.glob(os.path.join(tag_dir, "*mp_rank_01*")):
        raise ValueError(f"{tag_dir} was saved with tensor or pipeline model parallelism (mp_rank_01 files); "
                         "deepscale reads DeepSpeed checkpoints of data-parallel runs only. Convert it with "
                         "DeepSpeed's ds_to_universal first")
    ms = model_states if model_states is not None else load_ds_file(files[0])
    param_shapes = [dict(group) for group in (ms.get("param_shapes") or [])]
    optim_files = _optim_files(tag_dir)
    if universal:
        stage = as_int(load_ds_file(os.path.join(tag_dir, UNIVERSAL_DIR, UNIVERSAL_OPTIM_FILE)).get("zero_stage", 0))
        shards, num_shards = (lambda: _universal_shards(tag_dir, param_shapes)), 1
    elif not optim_files:
        stage, num_shards = 0, 1
        shards = lambda: _stage0_shards(ms)  # noqa: E731
    else:
        stage = as_int(load_ds_file(optim_files[0])["optimizer_state_dict"].get("zero_stage", 1))
        reader = _stage3_shards if stage == 3 else _stage12_shards
        shards, num_shards = (lambda: reader(optim_files, param_shapes)), len(optim_files)
    module = ms["module"]
    if stage == 3:  # ZeRO-3 model states hold empty parameters
        module = _full_module_from_shards(ms, shards)
    model_states = {
        "format_version": CHECKPOINT_FORMAT_VERSION, "deepspeed_version": ms.get("ds_version"), "module": module,
        "frozen_param_names": list((ms.get("frozen_param_shapes") or {}).keys()),
        "num_optimizer_shards": num_shards, "lr_scheduler": ms.get("lr_scheduler"),
        "counters": {key: int(ms[key]) for key in ("global_steps", "global_samples", "skipped_steps") if key in ms},
        "ds_config": ms.get("ds_config"), "dp_world_size": ms.get("dp_world_size"), "zero_stage": stage,
        "client_state": {key: value for key, value in ms.items() if key not in _DS_KEYS},
    }
    return model_states, shards
