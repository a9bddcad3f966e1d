"""``get_model_profile``: profile one forward (or ``generate``) call of a model."""
import torch

from deepscale.profiling.flops_profiler import units
from deepscale.profiling.flops_profiler.profiler import FlopsProfiler

_MODES = ("forward", "generate")


def _input_from_shape(model: torch.nn.Module, input_shape) -> torch.Tensor:
    if not isinstance(input_shape, tuple) or len(input_shape) < 1:
        raise ValueError(f"get_model_profile: input_shape must be a non-empty tuple, got {input_shape!r}")
    param = next(model.parameters(), None)
    if param is None:
        return torch.empty(input_shape)
    # Uninitialised like DeepSpeed's: the FLOPs of a forward do not depend on the values.
    return torch.empty(input_shape, dtype=param.dtype, device=param.device)


def _call(model, args, kwargs, mode):
    fn = model if mode == "forward" else model.generate
    return fn(*args, **kwargs)


def get_model_profile(model, input_shape=None, args=[], kwargs={}, print_profile=True, detailed=True,
                      module_depth=-1, top_modules=1, warm_up=1, as_string=True, output_file=None,
                      ignore_modules=None, mode="forward"):
    """FLOPs, MACs and parameters of one ``model(*args, **kwargs)`` call (DeepSpeed's signature).

    The model is put in eval mode and called ``warm_up`` times unprofiled, then once profiled.

    Args:
        model: an ``nn.Module``.
        input_shape: a tuple; the model is called with one uninitialised tensor of this shape
            (the first parameter's dtype and device) instead of ``args``. Default None.
        args: positional arguments. Default ``[]``.
        kwargs: keyword arguments. Default ``{}``.
        print_profile: print the report. Default True.
        detailed: include the per-module tree in it. Default True.
        module_depth: deepest module level shown (-1: all). Default -1.
        top_modules: modules per depth in the aggregated part. Default 1.
        warm_up: unprofiled calls first (latency is then measured warm). Default 1.
        as_string: return ``("1.2 G", "0.6 GMACs", "125 M")`` strings rather than numbers. Default True.
        output_file: write the report there instead of stdout. Default None.
        ignore_modules: module classes whose operators count in their parent. Default None.
        mode: ``"forward"`` calls the model, ``"generate"`` calls ``model.generate``. Default ``"forward"``.

    Returns:
        ``(flops, macs, params)`` of the profiled forward.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"get_model_profile: model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"get_model_profile: mode must be one of {_MODES}, got {mode!r}")
    if mode == "generate" and not hasattr(model, "generate"):
        raise ValueError(f"get_model_profile: mode='generate' needs a model with a generate() method; "
                         f"{type(model).__name__} has none")
    if input_shape is not None:
        args = [_input_from_shape(model, input_shape)]
    if not args and not kwargs:
        raise ValueError("get_model_profile: give input_shape, args or kwargs (the model's inputs)")
    model.eval()
    for _ in range(int(warm_up)):
        _call(model, args, kwargs, mode)
    prof = FlopsProfiler(model)
    prof.start_profile(ignore_list=ignore_modules)
    try:
        _call(model, args, kwargs, mode)
        flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
        if print_profile:
            prof.print_model_profile(profile_step=warm_up, module_depth=module_depth, top_modules=top_modules,
                                     detailed=detailed, output_file=output_file)
    finally:
        prof.end_profile()
    if as_string:
        return units.number_to_string(flops), units.macs_to_string(macs), units.params_to_string(params)
    return flops, macs, params
