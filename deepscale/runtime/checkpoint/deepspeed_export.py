"""Export a deepscale checkpoint to DeepSpeed's universal checkpoint layout.

DeepSpeed (0.19) loads that layout at any world size and ZeRO stage 1-3 when its config sets
``"checkpoint": {"load_universal": true}``, so a run can go back from deepscale to DeepSpeed.
What is written (see ``deepspeed_format.py`` for the layout as DeepSpeed writes it)::

    OUTPUT/latest_universal                 the tag (DeepSpeed reads this file in universal mode)
    OUTPUT/TAG/mp_rank_00_model_states.pt    module weights, lr scheduler, step counters, config,
                                             client state (DeepSpeed's keys)
    OUTPUT/TAG/zero_pp_rank_0_mp_rank_00_model_states.pt
                                             the same, under the name DeepSpeed's ZeRO-3 looks for
    OUTPUT/TAG/zero/optimizer_state.pt       param groups (hyperparameters), Adam's step
    OUTPUT/TAG/zero/NAME/fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt
                                             whole fp32 master and optimizer state of each parameter

Usage::

    python -m deepscale.runtime.checkpoint.deepspeed_export CHECKPOINT_DIR OUTPUT_DIR [--tag TAG]

Memory: the whole fp32 model and its optimizer state are assembled once on the CPU.
"""
import argparse
import os
import sys
from typing import Dict, Optional

import torch

from deepscale.runtime.checkpoint.atomic import write_latest_tag
from deepscale.runtime.checkpoint.deepspeed_format import (LATEST_UNIVERSAL_FILE, NOT_HYPERPARAMETERS, UNIVERSAL_DIR,
                                                           UNIVERSAL_OPTIM_FILE)
from deepscale.utils.checkpoint_files import load_file, save_file
from deepscale.utils.zero_to_fp32 import MODEL_STATES_FILE, iter_optimizer_shards, resolve_tag_dir

DEEPSPEED_LAYOUT_VERSION = "0.19.8"  # the DeepSpeed release whose layout is written
ZERO3_MODEL_STATES_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _assemble(tag_dir: str, num_shards: int):
    """Whole flat tensors per (name, key) from every shard, plus each trained name's group."""
    tensors: Dict[str, Dict[str, torch.Tensor]] = {}
    shapes, group_of, first = {}, {}, None
    for shard in iter_optimizer_shards(tag_dir, num_shards):
        if first is None:
            first = shard
        for group, hyper in enumerate(shard["param_groups"]):
            group_of.update({name: group for name in hyper["names"]})
        for name, entry in shard["fragments"].items():
            shapes[name] = torch.Size(entry["shape"])
            slots = tensors.setdefault(name, {})
            for key, value in [("fp32", entry["fp32"]), *entry["state"].items()]:
                flat = slots.setdefault(key, torch.zeros(shapes[name].numel(), dtype=value.dtype))
                flat[entry["start"]:entry["start"] + value.numel()].copy_(value)
    if first is None:
        raise ValueError(f"{tag_dir} holds no optimizer state (it was saved without an optimizer); there is nothing "
                         "to export beyond the module weights, which mp_rank_00_model_states.pt already holds")
    return tensors, shapes, group_of, first


def _model_states(saved: dict, shapes: Dict[str, torch.Size], groups: list) -> dict:
    trained = set(shapes)
    frozen = set(saved.get("frozen_param_names") or ())
    counters = saved.get("counters", {})
    states = {
        "module": saved["module"],
        "buffer_names": [name for name in saved["module"] if name not in trained and name not in frozen],
        "optimizer": None,
        "param_shapes": [{name: shapes[name] for name in group["names"] if name in shapes} for group in groups],
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
        "lr_scheduler": saved.get("lr_scheduler"), "data_sampler": None, "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": int(counters.get("skipped_steps", 0)), "global_steps": int(counters.get("global_steps", 0)),
        "global_samples": int(counters.get("global_samples", 0)),
        "dp_world_size": int(saved.get("dp_world_size") or 1), "mp_world_size": 1,
        "ds_config": saved.get("ds_config"), "ds_version": DEEPSPEED_LAYOUT_VERSION,
    }
    # DeepSpeed keeps client state at the top level of the model states.
    states.update({k: v for k, v in (saved.get("client_state") or {}).items() if k not in states})
    return states


def _write_atomically(obj, path: str) -> None:
    save_file(obj, path + ".tmp")  # names the file and a full disk in its errors
    os.replace(path + ".tmp", path)


def export_to_deepspeed_universal(checkpoint_dir: str, output_dir: str, tag: Optional[str] = None) -> str:
    """Write the deepscale checkpoint ``checkpoint_dir`` (tag ``tag``) as a DeepSpeed universal checkpoint.

    Args:
        checkpoint_dir: a deepscale checkpoint root (holding ``latest``) or a tag directory.
        output_dir: where to write; receives ``TAG/`` and ``latest_universal``.
        tag: the tag to export. Default: the one ``latest`` names.

    Returns:
        The written tag directory.

    Raises:
        ValueError: the checkpoint holds no optimizer state.
    """
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    tag = os.path.basename(os.path.normpath(tag_dir))
    saved = load_file(os.path.join(tag_dir, MODEL_STATES_FILE))
    tensors, shapes, group_of, first = _assemble(tag_dir, int(saved.get("num_optimizer_shards", 0)))
    groups = first["param_groups"]
    steps = [scalars.get("step") for scalars in first.get("group_scalars", [])]
    out_tag = os.path.join(output_dir, tag)
    for name, slots in tensors.items():
        folder = os.path.join(out_tag, UNIVERSAL_DIR, name)
        os.makedirs(folder, exist_ok=True)
        for key, flat in slots.items():
            _write_atomically({"param": flat.view(shapes[name]), "cat_dim": 0}, os.path.join(folder, f"{key}.pt"))
        step = steps[group_of[name]] if group_of[name] < len(steps) else None
        if step is not None:
            _write_atomically(torch.as_tensor(step, dtype=torch.float32), os.path.join(folder, "step.pt"))
    hypers = [{**{k: v for k, v in group.items() if k != "names" and k not in NOT_HYPERPARAMETERS}, "params": [index]}
              for index, group in enumerate(groups)]
    common = {"ds_version": DEEPSPEED_LAYOUT_VERSION, "zero_stage": int(saved.get("zero_stage", 0)),
              "param_groups": hypers, "partition_count": int(saved.get("dp_world_size") or 1),
              "optimizer_state_dict": {"state": {index: {"step": torch.as_tensor(step, dtype=torch.float32)}
                                                 for index, step in enumerate(steps) if step is not None},
                                       "param_groups": hypers}}
    _write_atomically(common, os.path.join(out_tag, UNIVERSAL_DIR, UNIVERSAL_OPTIM_FILE))
    model_states = _model_states(saved, shapes, groups)
    for name in (MODEL_STATES_FILE, ZERO3_MODEL_STATES_FILE):
        _write_atomically(model_states, os.path.join(out_tag, name))
    write_latest_tag(output_dir, tag, LATEST_UNIVERSAL_FILE)
    return out_tag


def main(argv=None) -> int:
    """``python -m deepscale.runtime.checkpoint.deepspeed_export CHECKPOINT_DIR OUTPUT_DIR [--tag TAG]``."""
    parser = argparse.ArgumentParser(description="Export a deepscale checkpoint as a DeepSpeed universal checkpoint "
                                                 "(load it in DeepSpeed with checkpoint.load_universal: true).")
    parser.add_argument("checkpoint_dir", help="deepscale checkpoint root (with 'latest') or a tag directory")
    parser.add_argument("output_dir", help="where to write the universal checkpoint")
    parser.add_argument("-t", "--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    args = parser.parse_args(argv)
    try:
        path = export_to_deepspeed_universal(args.checkpoint_dir, args.output_dir, tag=args.tag)
    except (FileNotFoundError, ValueError) as err:
        print(f"deepspeed_export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
