"""The text of the flops profile: summary, top modules per depth and the module tree."""
import os
from collections import defaultdict
from typing import List, Optional, Tuple

from deepscale.profiling.flops_profiler.profiler import BACKWARD, FORWARD, RECOMPUTE, module_params
from deepscale.profiling.flops_profiler.units import (DEFAULT_PRECISION, duration_to_string, flops_to_string,
                                                      macs_to_string, number_to_string, params_to_string)

_RULE = "-" * 30
_LINE = "{:<58}{}"


def write_report(text: str, output_file: Optional[str]) -> None:
    """Print ``text``, or write it to ``output_file`` (its directory is created)."""
    if not output_file:
        print(text)
        return
    directory = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(directory, exist_ok=True)
    with open(output_file, "w") as f:
        f.write(text + "\n")


def _share(part: float, whole: float) -> str:
    return f"{round(100 * part / whole, DEFAULT_PRECISION) if whole else 0:g}%"


def _engine_lines(prof) -> List[Tuple[str, str]]:
    engine = prof.ds_engine
    if engine is None:
        return []
    lines = [("world size:", str(engine.world_size)), ("data parallel size:", str(engine.dp_world_size)),
             ("batch size per GPU:", str(engine.train_micro_batch_size_per_gpu()))]
    step = prof.engine_timings or {}
    if step.get("micro_batches", 1) != 1:
        lines.append(("micro-batches profiled (counts are their sum):", str(step["micro_batches"])))
    return lines


def _flops_lines(prof) -> List[Tuple[str, str]]:
    by_phase = prof.get_flops_by_phase()
    fwd = by_phase[FORWARD]
    lines = [("params per GPU (tied weights once, ZeRO-3 full size):", params_to_string(prof.get_total_params())),
             ("fwd MACs per GPU:", macs_to_string(fwd["macs"])),
             ("fwd flops per GPU (2 x MACs):", number_to_string(fwd["flops"])),
             ("fwd other flops per GPU (norms, activations, ...):", number_to_string(fwd["other_flops"]))]
    outside = fwd["flops"] + fwd["other_flops"] - prof.module_flops(prof.model, include_other=True)
    if outside > 0:
        lines.append(("  of which outside the model's modules:", number_to_string(outside)))
    if prof.backward_profiled:
        for phase, label in ((BACKWARD, "bwd"), (RECOMPUTE, "recompute")):
            lines.append((f"{label} flops per GPU (measured; other flops):",
                          f"{number_to_string(by_phase[phase]['flops'])}; "
                          f"{number_to_string(by_phase[phase]['other_flops'])}"))
    else:
        lines += [("bwd flops per GPU (estimated, 2 x fwd):", number_to_string(2 * fwd["flops"])),
                  (f"recompute flops per GPU (estimated, {prof.recompute_fwd_factor:g} x fwd):",
                   number_to_string(prof.recompute_fwd_factor * fwd["flops"]))]
    lines += [("fwd+bwd flops per GPU:", number_to_string(prof.get_training_flops(include_recompute=False))),
              ("fwd+bwd+recompute flops per GPU:", number_to_string(prof.get_training_flops())),
              ("  with other flops:", number_to_string(prof.get_training_flops(include_other=True)))]
    return lines


def _rate_lines(prof) -> List[Tuple[str, str]]:
    step = prof.engine_timings
    fwd_flops = prof.get_total_flops()
    if not step:
        latency = prof.get_total_duration()
        lines = [("fwd latency (model forward):", duration_to_string(latency))]
        if latency:
            lines.append(("fwd FLOPS per GPU:", flops_to_string(fwd_flops / latency)))
        return lines
    fwd, bwd, opt = step["forward"], step["backward"], step["step"]
    iteration = fwd + bwd + opt
    lines = [("latencies measured at:", step.get("latency_source", "the profiled step")),("fwd latency:", duration_to_string(fwd)), ("bwd latency:", duration_to_string(bwd)),
             ("step latency:", duration_to_string(opt)), ("iter latency:", duration_to_string(iteration))]
    if fwd:
        lines.append(("fwd FLOPS per GPU:", flops_to_string(fwd_flops / fwd)))
    if iteration:
        model_rate = prof.get_training_flops(include_recompute=False) / iteration
        lines += [("model FLOPS per GPU = fwd+bwd flops / iter latency:", flops_to_string(model_rate)),
                  ("hardware FLOPS per GPU (recompute included):",
                   flops_to_string(prof.get_training_flops() / iteration))]
        peak = step.get("peak_flops")
        if peak:
            lines.append((f"MFU (peak {flops_to_string(peak)}):", _share(model_rate, peak)))
        lines.append(("samples/second:", f"{round(step['samples'] / iteration, DEFAULT_PRECISION):g}"))
        if step.get("tokens"):
            lines.append(("tokens/second:", f"{round(step['tokens'] / iteration, DEFAULT_PRECISION):g}"))
    return lines


def _module_levels(model, module_depth: int):
    """``[(depth, name, module)]`` in tree order, down to ``module_depth`` (-1: all)."""
    out = []

    def walk(module, name, depth):
        out.append((depth, name, module))
        if module_depth < 0 or depth < module_depth:
            for child_name, child in module.named_children():
                walk(child, child_name, depth + 1)

    walk(model, type(model).__name__, 0)
    return out


def format_aggregated_profile(prof, module_depth: int = -1, top_modules: int = 1) -> str:
    """Top ``top_modules`` module classes by params, MACs and fwd latency at each depth."""
    per_depth = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))  # depth -> class -> [macs, params, s]
    for depth, _, module in _module_levels(prof.model, module_depth):
        entry = per_depth[depth][type(module).__name__]
        entry[0] += prof.module_macs(module)
        entry[1] += module_params(module)
        entry[2] += prof.module_duration(module)
    lines = [f"Top {top_modules} modules in params, MACs and fwd latency at each depth:"]
    for depth in sorted(per_depth):
        classes = per_depth[depth]

        def top(index, fmt):
            ranked = sorted(classes.items(), key=lambda item: -item[1][index])[:top_modules]
            return "{" + ", ".join(f"'{name}': '{fmt(v[index])}'" for name, v in ranked) + "}"

        lines += [f"depth {depth}:", f"    params      - {top(1, params_to_string)}",
                  f"    MACs        - {top(0, macs_to_string)}", f"    fwd latency - {top(2, duration_to_string)}"]
    return "\n".join(lines)


def format_module_tree(prof, module_depth: int = -1) -> str:
    """One line per module: params, MACs, fwd latency (each with its share of the model) and FLOPS."""
    total_params, total_macs = prof.get_total_params(), prof.get_total_macs()
    total_duration = prof.get_total_duration()
    lines = []
    for depth, name, module in _module_levels(prof.model, module_depth):
        params, macs = module_params(module), prof.module_macs(module)
        flops, duration = prof.module_flops(module, include_other=True), prof.module_duration(module)
        rate = flops_to_string(flops / duration) if duration else flops_to_string(0)
        lines.append(f"{'  ' * depth}({name}) {type(module).__name__}: "
                     f"{params_to_string(params)} = {_share(params, total_params)} params, "
                     f"{macs_to_string(macs)} = {_share(macs, total_macs)} MACs, "
                     f"{duration_to_string(duration)} = {_share(duration, total_duration)} latency, {rate}")
    return "\n".join(lines)


def format_model_profile(prof, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1,
                         detailed: bool = True) -> str:
    """The whole report :meth:`FlopsProfiler.print_model_profile` prints."""
    summary = _engine_lines(prof) + _flops_lines(prof) + _rate_lines(prof)
    parts = [f"\n{_RULE} deepscale flops profiler {_RULE}", f"Profile summary at step {profile_step}:",
             "Counted at the PyTorch dispatcher (every aten operator that ran). params: parameters; MACs:\n"
             "multiply-accumulates of matrix products, convolutions and attention; flops: their floating-point\n"
             "operations (2 per MAC); other flops: norms, activations, softmax, element-wise; FLOPS: flops per\n"
             "second; recompute: forward work redone in backward by activation checkpointing.\n"]
    parts += [_LINE.format(label, value) for label, value in summary]
    ops = prof.get_op_flops(FORWARD)
    if ops:
        top = ", ".join(f"{op} {number_to_string(n)}" for op, n in list(ops.items())[:6])
        parts.append(_LINE.format("largest fwd operators:", top))
    parts += [f"\n{_RULE} aggregated profile per GPU {_RULE}", format_aggregated_profile(prof, module_depth,
                                                                                            top_modules)]
    if detailed:
        parts += [f"\n{_RULE} detailed profile per GPU {_RULE}",
                  "Each module: params, share of params, MACs, share of MACs, fwd latency, share of fwd latency,\n"
                  "fwd FLOPS (other flops included). Operators called directly in a parent (a loss, F.linear on a tied weight) count in\n"
                  "the parent, so a parent can exceed the sum of its children.\n",
                  format_module_tree(prof, module_depth)]
    parts.append("-" * 84)
    return "\n".join(parts)
