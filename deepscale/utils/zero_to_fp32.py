"""Consolidate a deepscale checkpoint (ZeRO stage 0, 1 or 2) into one fp32 state dict.

Usable three ways:
  * from Python: :func:`get_fp32_state_dict_from_zero_checkpoint`,
    :func:`load_state_dict_from_zero_checkpoint`, :func:`convert_zero_checkpoint_to_fp32_state_dict`;
  * offline: ``deepscale-zero-to-fp32 CHECKPOINT_DIR OUTPUT [--tag TAG] [--safetensors]``;
  * or by copying this file next to a checkpoint: it imports nothing from deepscale.

Memory: the fp32 result is allocated once; optimizer shards are memory-mapped and read one at a
time, and the module weights (for frozen parameters and buffers) are memory-mapped too, so the
model is never held twice. The file layout is described in
``deepscale/runtime/checkpoint/engine_checkpoint.py`` and ``portable.py``.
"""
import argparse
import glob
import os
import sys
from typing import Dict, Iterator, Optional

import torch

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE_FORMAT = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
# Tensor-parallel checkpoints: one set of data-parallel shards per tensor-parallel rank (mp rank).
TP_OPTIM_FILE_FORMAT = "zero_pp_rank_{rank}_mp_rank_{mp:02d}_optim_states.pt"
LATEST_FILE = "latest"
CHECKPOINT_FORMAT_VERSION = 2  # of the model-states file deepscale writes


# the per-expert weight files of MoE checkpoints (runtime/checkpoint/expert_files.py)
EXPERT_FILES_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"


def _load(path: str):
    # This file imports nothing from deepscale (see above), so it names damaged files itself.
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError):  # files not in the zip format cannot be memory-mapped (or are damaged)
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, ModuleNotFoundError, AttributeError):
        raise
    except Exception as exc:
        raise RuntimeError(f"checkpoint file {path} is truncated or corrupt ({os.path.getsize(path)} bytes): "
                           f"{type(exc).__name__}: {exc}") from exc


def iter_optimizer_shards(tag_dir: str, num_shards: int, mp_rank: int = 0) -> Iterator[dict]:
    """Yield the optimizer shards of a tag directory one at a time (memory-mapped); ``mp_rank``
    selects a tensor-parallel rank's shards. Default 0."""
    for rank in range(num_shards):
        path = os.path.join(tag_dir, TP_OPTIM_FILE_FORMAT.format(rank=rank, mp=mp_rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"optimizer shard {path} is missing: the checkpoint was saved by {num_shards} "
                                    "ranks and every shard is needed")
        yield _load(path)


def resolve_tag_dir(checkpoint_dir: str, tag: Optional[str] = None) -> str:
    """The tag directory to read: ``checkpoint_dir/tag``, the one ``latest`` names, or
    ``checkpoint_dir`` itself when it already is a tag directory."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if tag is None:
        if os.path.isfile(os.path.join(checkpoint_dir, MODEL_STATES_FILE)):
            return checkpoint_dir
        latest = os.path.join(checkpoint_dir, LATEST_FILE)
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"{checkpoint_dir} has no '{LATEST_FILE}' file and is not a tag directory; "
                                    "name the checkpoint tag (tag= from Python, --tag TAG on the command line) "
                                    "or give the tag directory itself as checkpoint_dir")
        with open(latest) as handle:
            tag = handle.read().strip()
    tag_dir = os.path.join(checkpoint_dir, str(tag))
    if not os.path.isfile(os.path.join(tag_dir, MODEL_STATES_FILE)):
        raise FileNotFoundError(f"{tag_dir} is not a deepscale checkpoint (no {MODEL_STATES_FILE}); check "
                                f"checkpoint_dir and the tag (tag= from Python, --tag TAG on the command line)")
    return tag_dir


def _fill_from_shards(tag_dir: str, num_shards: int, out: Dict[str, torch.Tensor],
                      shapes: Optional[Dict[str, tuple]] = None) -> set:
    """Copy every shard's fp32 fragments into ``out`` (allocated on first sight, flat); returns
    names. ``shapes``, when given, receives each parameter's shape."""
    filled = {}
    for shard in iter_optimizer_shards(tag_dir, num_shards):
        for name, entry in shard["fragments"].items():
            if name not in out:
                numel = 1
                for dim in entry["shape"]:
                    numel *= int(dim)
                out[name] = torch.empty(numel, dtype=torch.float32)
                filled[name] = 0
                if shapes is not None:
                    shapes[name] = tuple(int(d) for d in entry["shape"])
            start, values = int(entry["start"]), entry["fp32"]
            out[name][start:start + values.numel()].copy_(values)
            filled[name] += values.numel()
        del shard
    incomplete = [n for n, count in filled.items() if count != out[n].numel()]
    if incomplete:
        raise ValueError(f"checkpoint {tag_dir} does not cover all of {incomplete[:3]}; is a shard missing?")
    return set(filled)


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str, tag: Optional[str] = None,
                                             exclude_frozen_parameters: bool = False) -> Dict[str, torch.Tensor]:
    """The model's state dict with fp32 master weights, from any stage and world size.

    Args:
        checkpoint_dir: the checkpoint root (holding ``latest``) or a tag directory.
        tag: the tag to read. Default: the one ``latest`` names.
        exclude_frozen_parameters: leave out parameters the optimizer did not train. Default False.

    Returns:
        name -> tensor, in the module's ``state_dict`` order: trained parameters in fp32 from
        the optimizer shards; frozen parameters (as fp32) and buffers from the module weights.
    """
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    model_states = _load(os.path.join(tag_dir, MODEL_STATES_FILE))
    if "ds_version" in model_states and "format_version" not in model_states:
        raise ValueError(f"{tag_dir} was written by DeepSpeed: load it into a deepscale engine "
                         "(engine.load_checkpoint) and save it again, or use DeepSpeed's own zero_to_fp32")
    module = model_states["module"]
    if model_states.get("pipeline") is not None:
        module = pipeline_module_weights(tag_dir, model_states["pipeline"])
    fp32: Dict[str, torch.Tensor] = {}
    # A tensor-parallel checkpoint's shards hold slices of sharded parameters; its module
    # weights are whole (gathered at save), so they are the answer.
    num_shards = 0 if int(model_states.get("tp_world_size", 1)) > 1 else int(model_states.get("num_optimizer_shards", 0))
    shapes: Dict[str, tuple] = {}
    trained = _fill_from_shards(tag_dir, num_shards, fp32, shapes)
    frozen = set(model_states.get("frozen_param_names", ()))
    result = {}
    for name, value in module.items():
        if name in trained:
            result[name] = fp32.pop(name).view(value.shape)
        elif exclude_frozen_parameters and name in frozen:
            continue
        else:
            result[name] = (value.float() if value.is_floating_point() else value).clone()
    # trained tensors the module weights do not list: the experts of MoE layers, which have
    # files of their own and global names (runtime/checkpoint/expert_files.py)
    for name, value in fp32.items():
        result[name] = value.view(shapes[name])
    # expert weights no optimizer shard holds (frozen experts) come from the per-expert files
    if not exclude_frozen_parameters:
        for path in sorted(glob.glob(os.path.join(tag_dir, EXPERT_FILES_GLOB))):
            for name, value in _load(path).items():
                if name not in result:
                    result[name] = (value.float() if value.is_floating_point() else value).clone()
    return result


def load_state_dict_from_zero_checkpoint(model: torch.nn.Module, checkpoint_dir: str, tag: Optional[str] = None,
                                         strict: bool = True) -> torch.nn.Module:
    """Load the consolidated fp32 weights into ``model`` (moved to CPU) and return it.

    The model keeps its dtype, as in DeepSpeed: a bf16 model receives the fp32 masters
    rounded to bf16 (``load_state_dict`` copies into the existing tensors). Parameters a
    checkpoint saved with ``exclude_frozen_parameters=True`` left out keep the model's own
    values, even with ``strict``. Do not use the model with an engine afterwards without
    re-initializing it.

    Args:
        model: the module to fill.
        checkpoint_dir, tag: see :func:`get_fp32_state_dict_from_zero_checkpoint`.
        strict: refuse missing and unexpected keys (other than excluded frozen ones). Default True.
    """
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    state = get_fp32_state_dict_from_zero_checkpoint(tag_dir)
    model = model.cpu()
    load_module_weights(model, state, _load(os.path.join(tag_dir, MODEL_STATES_FILE)), strict,
                        where=tag_dir, strict_name="strict")
    return model


PIPELINE_LAYER_FILE = "layer_{index:02d}-model_states.pt"


def pipeline_module_weights(tag_dir: str, pipeline: dict) -> Dict[str, torch.Tensor]:
    """The whole module state dict of a pipeline checkpoint, read from its per-layer files.

    Args:
        tag_dir: the tag directory.
        pipeline: the model-states ``pipeline`` entry: ``layer_prefixes`` maps each layer index to
            the state-dict prefix of its module (``"3."`` or ``"tied_modules.embed."``).
    """
    weights: Dict[str, torch.Tensor] = {}
    for index, prefix in sorted((int(i), p) for i, p in pipeline["layer_prefixes"].items()):
        path = os.path.join(tag_dir, PIPELINE_LAYER_FILE.format(index=index))
        if os.path.isfile(path):  # layers without state write no file
            for key, value in _load(path).items():
                weights[prefix + key] = value
    return weights


def load_module_weights(module: torch.nn.Module, weights: Dict[str, torch.Tensor], model_states: dict,
                        strict: bool, where: str, strict_name: str) -> None:
    """``module.load_state_dict(weights)``, where the frozen parameters a checkpoint saved with
    ``exclude_frozen_parameters=True`` left out keep the module's values and are not missing.

    Args:
        module: the module to fill; keeps its dtype (values are copied into its tensors).
        weights: name -> tensor.
        model_states: the checkpoint's model-states dict (``excluded_frozen_param_names``).
        strict: refuse other missing keys and unexpected keys.
        where: the checkpoint path, for the error message.
        strict_name: the caller's name of its ``strict`` argument, for the error message.
    """
    excluded = set(model_states.get("excluded_frozen_param_names", ()))
    if not excluded:
        module.load_state_dict(weights, strict=strict)
        return
    result = module.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k not in excluded]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"the module weights in {where} do not match the model: missing keys {missing[:5]}, "
                           f"unexpected keys {result.unexpected_keys[:5]}; pass {strict_name}=False to load "
                           "what matches")


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir: str, output_file: str, tag: Optional[str] = None,
                                               safe_serialization: bool = False,
                                               exclude_frozen_parameters: bool = False) -> str:
    """Write the consolidated fp32 state dict to ``output_file``; returns the path written.

    Args:
        checkpoint_dir, tag, exclude_frozen_parameters: see :func:`get_fp32_state_dict_from_zero_checkpoint`.
        output_file: target file (``torch.save`` format, or safetensors when ``safe_serialization``
            or the name ends in ``.safetensors``).
        safe_serialization: write safetensors (needs the ``safetensors`` package). Default False.
    """
    output_file = os.fspath(output_file)
    use_safetensors = safe_serialization or output_file.endswith(".safetensors")
    if use_safetensors:
        try:
            from safetensors.torch import save_file
        except ImportError as err:
            raise ImportError("safetensors output (safe_serialization=True from Python, --safe_serialization on "
                              "the command line, or an output name ending in .safetensors) needs the "
                              "'safetensors' package: pip install safetensors") from err
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    if use_safetensors:
        # safetensors refuses tensors that share memory; ours never do, but buffers may be views.
        save_file({k: v.contiguous() for k, v in state.items()}, output_file, metadata={"format": "pt"})
    else:
        torch.save(state, output_file)
    return output_file


def main(argv=None) -> int:
    """Console entry point ``deepscale-zero-to-fp32``."""
    parser = argparse.ArgumentParser(prog="deepscale-zero-to-fp32",
                                     description="Consolidate a deepscale ZeRO checkpoint into one fp32 state dict.")
    parser.add_argument("checkpoint_dir", help="checkpoint root (with 'latest') or a tag directory")
    parser.add_argument("output_file", help="where to write the state dict (.pt/.bin, or .safetensors)")
    parser.add_argument("-t", "--tag", default=None,
                        help="checkpoint tag, the sub-directory of checkpoint_dir (default: the one 'latest' names)")
    parser.add_argument("--safe_serialization", "--safetensors", action="store_true",
                        help="write safetensors instead of torch.save")
    parser.add_argument("--exclude_frozen_parameters", action="store_true", help="leave out frozen parameters")
    args = parser.parse_args(argv)
    try:
        path = convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, args.output_file, tag=args.tag,
                                                          safe_serialization=args.safe_serialization,
                                                          exclude_frozen_parameters=args.exclude_frozen_parameters)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"deepscale-zero-to-fp32: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
