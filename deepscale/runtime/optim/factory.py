"""Build the optimizer named by an ``optimizer`` config section (DeepSpeed-compatible).

Names are matched case-insensitively against ``VALID_OPTIMIZER_NAMES`` (DeepSpeed's
spelling); any other name that is exactly a ``torch.optim`` class (``RMSprop``, ``Adamax``,
...) is built from torch, as DeepSpeed does. Names of DeepSpeed optimizers we do not
provide yet (``UNAVAILABLE_OPTIMIZER_NAMES``) get an error saying so.

Note (Adam flavours): DeepSpeed's ``adam`` is AdamW unless ``adam_w_mode`` is false: the
``adam_w_mode`` param (default True) selects decoupled weight decay (Loshchilov & Hutter
2019), and the ``adamw`` name always decouples. ``torch_adam`` asks for the torch
implementation even where a compiled one exists.

Note (compiled optimizers): adam/adamw, adagrad and lion go through
``compiled.build_preferred``, which picks deepscale's compiled optimizer where it is the
faster choice (parameters on CPU; Adam on CUDA) and torch's otherwise; see its Note.

Note (fused kernels): on the 2-core CPU dev machine with torch 2.13, one AdamW step over
25.2M fp32 parameters took 16.3 ms with ``fused=True``, 52.3 ms with ``foreach=True`` and
67.4 ms with the per-tensor loop (Adam: 16.3 / 58.4 / 51.1 ms); a rerun under load from
other jobs kept fused the fastest (AdamW 46 / 96 / 62 ms, Adam 19 / 135 / 106 ms). So
Adam/AdamW get ``fused=True`` whenever torch accepts it for the parameters' devices and
dtypes (CPU and CUDA both have the kernel), else torch's own default, whenever torch's Adam is
the one chosen (``torch_adam``, a compiled op that cannot build, or a torch-only option).
"""
import inspect

import torch

from deepscale.config.params import check_call_kwargs
from deepscale.runtime.optim.compiled import build_preferred
from deepscale.runtime.optim.lion import Lion
from deepscale.utils.logging import logger

ADAM_OPTIMIZER = "adam"
ADAMW_OPTIMIZER = "adamw"
SGD_OPTIMIZER = "sgd"
ADAGRAD_OPTIMIZER = "adagrad"
LION_OPTIMIZER = "lion"
VALID_OPTIMIZER_NAMES = [ADAM_OPTIMIZER, ADAMW_OPTIMIZER, SGD_OPTIMIZER, ADAGRAD_OPTIMIZER, LION_OPTIMIZER]

LAMB_OPTIMIZER = "lamb"
ONEBIT_ADAM_OPTIMIZER = "onebitadam"
ZERO_ONE_ADAM_OPTIMIZER = "zerooneadam"
ONEBIT_LAMB_OPTIMIZER = "onebitlamb"
MUADAM_OPTIMIZER = "muadam"
MUADAMW_OPTIMIZER = "muadamw"
MUSGD_OPTIMIZER = "musgd"
MUON_OPTIMIZER = "muon"
UNAVAILABLE_OPTIMIZER_NAMES = [
    LAMB_OPTIMIZER, ONEBIT_ADAM_OPTIMIZER, ZERO_ONE_ADAM_OPTIMIZER, ONEBIT_LAMB_OPTIMIZER, MUADAM_OPTIMIZER,
    MUADAMW_OPTIMIZER, MUSGD_OPTIMIZER, MUON_OPTIMIZER
]

TORCH_ADAM_PARAM = "torch_adam"
ADAM_W_MODE = "adam_w_mode"
ADAM_W_MODE_DEFAULT = True
# Accepted for DeepSpeed configs written for FusedAdam; they have no torch counterpart
# that changes results (bias_correction must stay True, see _adam_kwargs).
_FUSED_ADAM_ONLY_KEYS = ("bias_correction", "set_grad_none")

_TORCH_CLASSES = {
    SGD_OPTIMIZER: torch.optim.SGD,
    ADAGRAD_OPTIMIZER: torch.optim.Adagrad,
    LION_OPTIMIZER: Lion,
}


def _accepted_keys(cls):
    """Keyword arguments of an optimizer class besides the parameters themselves."""
    signature = inspect.signature(cls.__init__)
    return [p.name for p in signature.parameters.values()
            if p.name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_keys(params, accepted, name):
    for key in params:
        if key == "max_grad_norm":
            raise ValueError("optimizer.params.max_grad_norm is not an optimizer parameter; "
                             "set the top-level 'gradient_clipping' instead")
        if key not in accepted:
            raise ValueError(f"optimizer.params.{key} is not accepted by optimizer '{name}'; "
                             f"accepted keys: {', '.join(accepted)}")


def _materialize(model_parameters):
    """A list of tensors or param-group dicts (generators can only be read once)."""
    if isinstance(model_parameters, torch.Tensor):
        raise TypeError("model_parameters must be an iterable of tensors or of param-group dicts, "
                        "not a single tensor")
    try:
        return list(model_parameters)
    except TypeError as err:
        raise TypeError(f"model_parameters must be an iterable of tensors or of param-group dicts, "
                        f"got {type(model_parameters).__name__}") from err


def _adam_kwargs(name, params):
    accepted = _accepted_keys(torch.optim.AdamW) + [TORCH_ADAM_PARAM, ADAM_W_MODE, *_FUSED_ADAM_ONLY_KEYS]
    _check_keys(params, accepted, name)
    kwargs = dict(params)
    torch_adam = bool(kwargs.pop(TORCH_ADAM_PARAM, False))
    adam_w_mode = kwargs.pop(ADAM_W_MODE, ADAM_W_MODE_DEFAULT)
    if not isinstance(adam_w_mode, bool):
        raise ValueError(f"optimizer.params.{ADAM_W_MODE} must be true or false, got {adam_w_mode!r}")
    if kwargs.pop("bias_correction", True) is not True:
        raise ValueError("optimizer.params.bias_correction: only true is supported (torch Adam always "
                         "corrects the moment bias)")
    kwargs.pop("set_grad_none", None)
    if not torch_adam:
        # Our torch path stands in for DeepSpeed's FusedAdam, whose weight_decay defaults
        # to 0 (torch AdamW's is 0.01); torch_adam keeps torch's own defaults, as DeepSpeed.
        kwargs.setdefault("weight_decay", 0.0)
    decoupled = name == ADAMW_OPTIMIZER or adam_w_mode
    return kwargs, torch_adam, decoupled


def _with_fused_if_supported(cls, param_list, kwargs):
    """Construct ``cls`` with ``fused=True`` when torch supports it here (fastest, see Note)."""
    if "fused" in kwargs or "foreach" in kwargs or "fused" not in _accepted_keys(cls):
        return cls(param_list, **kwargs)
    try:
        return cls(param_list, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError) as err:
        # Fused kernels exist only for some devices/dtypes (and not with e.g. differentiable).
        logger.debug(f"{cls.__name__}(fused=True) unavailable ({err}); using the default implementation")
        return cls(param_list, **kwargs)


def _build_adam(name, params, param_list, config_name):
    kwargs, torch_adam, decoupled = _adam_kwargs(name, params)
    check_call_kwargs("optimizer.params", kwargs, torch.optim.AdamW)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    if torch_adam:
        return _with_fused_if_supported(cls, param_list, kwargs)
    return build_preferred("adam", kwargs, param_list, cls, lambda: _with_fused_if_supported(cls, param_list, kwargs),
                           decoupled=decoupled, config_name=config_name)


def _torch_optim_class(name):
    cls = getattr(torch.optim, name, None)
    if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls
    return None


def build_optimizer(name: str, params: dict, model_parameters):
    """Build the optimizer of an ``optimizer`` config section.

    Args:
        name: ``optimizer.type``, case-insensitive: adam, adamw, sgd, adagrad, lion; or the
            exact name of a ``torch.optim`` class.
        params: ``optimizer.params`` (keyword arguments; None means {}). For adam/adamw also
            ``adam_w_mode`` (default True: decoupled weight decay) and ``torch_adam``.
        model_parameters: iterable of tensors, or of param-group dicts (``{"params": [...],
            "lr": ...}``), as ``torch.optim`` optimizers take.

    Returns:
        a ``torch.optim.Optimizer``: for adam/adamw/adagrad/lion deepscale's compiled optimizer
        where it applies (see ``compiled.build_preferred``), else the torch one.

    Raises:
        ValueError: unknown or unavailable name (``optimizer.type``) or a bad key
            (``optimizer.params.<key>``), listing what is accepted.
    """
    if not isinstance(name, str):
        raise TypeError(f"optimizer.type must be a string, got {type(name).__name__}")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise TypeError(f"optimizer.params must be a dict, got {type(params).__name__}")
    param_list = _materialize(model_parameters)
    key = name.lower()
    if key in (ADAM_OPTIMIZER, ADAMW_OPTIMIZER):
        return _build_adam(key, params, param_list, name)
    if key in _TORCH_CLASSES:
        cls = _TORCH_CLASSES[key]
        _check_keys(params, _accepted_keys(cls), key)
        check_call_kwargs("optimizer.params", params, cls)
        if key in (ADAGRAD_OPTIMIZER, LION_OPTIMIZER):
            return build_preferred(key, params, param_list, cls, lambda: cls(param_list, **params), config_name=name)
        return cls(param_list, **params)
    if key in UNAVAILABLE_OPTIMIZER_NAMES:
        raise ValueError(f"optimizer.type '{name}' is a DeepSpeed optimizer that deepscale does not provide yet; "
                         f"available: {', '.join(VALID_OPTIMIZER_NAMES)} or any torch.optim optimizer class")
    cls = _torch_optim_class(name)
    if cls is None:
        raise ValueError(f"optimizer.type '{name}' is not a known optimizer; allowed: "
                         f"{', '.join(VALID_OPTIMIZER_NAMES)} or any torch.optim optimizer class (e.g. RMSprop)")
    _check_keys(params, _accepted_keys(cls), name)
    check_call_kwargs("optimizer.params", params, cls)
    return cls(param_list, **params)
