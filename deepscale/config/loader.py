"""Turning the ways a config can be passed into one plain dict.

``deepscale.initialize`` accepts the config the way DeepSpeed does: as
``config`` (a dict or a JSON file path), as ``config_params`` (a dict, the
older name), or through ``args.deepscale_config`` / ``args.deepspeed_config``
(a JSON file path from the command line). Exactly one of them must be given.
Files are JSON, or hjson (JSON with comments, unquoted keys and optional
commas, which DeepSpeed also reads) when the optional ``hjson`` package is
installed. Duplicate keys are rejected because JSON parsers silently keep the
last one.
"""
import copy
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from deepscale.config.errors import InitializeArgumentError

_ARG_NAMES = ("deepscale_config", "deepspeed_config")

_HOW_TO_PASS = ("pass config=<dict or path to a JSON/hjson file>, config_params=<dict>, or args with "
                "args.deepscale_config (or args.deepspeed_config) set to a JSON file path")


def _reject_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def _error_context(text: str, lineno: int, colno: int) -> str:
    lines = text.splitlines()
    if not 1 <= lineno <= len(lines):
        return ""
    return f"\n    {lines[lineno - 1]}\n    {' ' * (colno - 1)}^"


def _json_error(path: str, text: str, err: json.JSONDecodeError) -> str:
    return (f"DeepScale config file '{path}' is not valid JSON: {err.msg} at line {err.lineno}, "
            f"column {err.colno}{_error_context(text, err.lineno, err.colno)}")


def _parse_hjson(path: str, text: str, json_err: json.JSONDecodeError) -> Any:
    """Second try for a file that is not strict JSON: hjson, as DeepSpeed reads configs."""
    try:
        import hjson
    except ImportError:
        raise ValueError(f"{_json_error(path, text, json_err)}\nIf the file is hjson (JSON with comments or "
                         "unquoted keys, which DeepSpeed accepts), install the hjson package: "
                         "pip install hjson") from None
    try:
        return hjson.loads(text, object_pairs_hook=_reject_duplicates)
    except hjson.HjsonDecodeError as err:
        raise ValueError(f"DeepScale config file '{path}' is neither valid JSON nor valid hjson: {err.msg} at "
                         f"line {err.lineno}, column {err.colno}"
                         f"{_error_context(text, err.lineno, err.colno)}") from None
    except ValueError as err:  # a duplicate key
        raise ValueError(f"DeepScale config file '{path}' is not valid: {err}") from None


def load_json_file(path) -> Dict[str, Any]:
    """Read a JSON (or hjson) config file into a dict.

    Strict JSON is tried first; a file that is not valid JSON is read as hjson
    when the ``hjson`` package is installed.

    Args:
        path: str or os.PathLike.

    Raises:
        FileNotFoundError: the file does not exist (the message shows the path).
        ValueError: the file is neither valid JSON nor hjson (line and column
            shown; the message says to ``pip install hjson`` when it is
            missing), has a duplicate key, or does not hold an object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"DeepScale config file '{path}' {what} "
                                f"(resolved to '{os.path.abspath(path)}')")
    with open(path, "r", encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as err:
        data = _parse_hjson(path, text, err)
    except ValueError as err:
        raise ValueError(f"DeepScale config file '{path}' is not valid: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"DeepScale config file '{path}' must hold a JSON object ({{...}}), "
                         f"got a JSON {type(data).__name__}")
    return data


def _args_path(args) -> Optional[Tuple[str, Any]]:
    """The (attribute name, path) given through ``args``, if any."""
    found = [(name, getattr(args, name)) for name in _ARG_NAMES if getattr(args, name, None) is not None]
    if len(found) == 2 and os.fspath(found[0][1]) != os.fspath(found[1][1]):
        raise InitializeArgumentError(f"args.deepscale_config ('{found[0][1]}') and args.deepspeed_config "
                         f"('{found[1][1]}') name different files; set only one")
    return found[0] if found else None


def _given_sources(config, config_params, args) -> List[Tuple[str, Any]]:
    sources = []
    if config is not None:
        sources.append(("config", config))
    if config_params is not None:
        sources.append(("config_params", config_params))
    from_args = _args_path(args) if args is not None else None
    if from_args is not None:
        sources.append((f"args.{from_args[0]}", from_args[1]))
    return sources


def load_config_dict(config=None, config_params=None, args=None) -> Dict[str, Any]:
    """Return the config as a dict, from exactly one source.

    Args:
        config: a dict, or a str / os.PathLike path to a JSON file. Default None.
        config_params: a dict (DeepSpeed's older argument name). Default None.
        args: an argparse Namespace (or any object) whose ``deepscale_config``
            or ``deepspeed_config`` attribute is a JSON file path. Default None.

    Returns:
        A new dict; the caller's dict is deep-copied, never modified.

    Raises:
        InitializeArgumentError: no source or more than one source is given (a
            ``ValueError`` that is also an ``AssertionError``, as DeepSpeed asserts).
        ValueError: a file is not valid JSON or hjson.
        TypeError: a source has the wrong type.
        FileNotFoundError: a config file does not exist.
    """
    sources = _given_sources(config, config_params, args)
    if not sources:
        raise InitializeArgumentError(f"No DeepScale config was given: {_HOW_TO_PASS}.")
    if len(sources) > 1:
        names = " and ".join(name for name, _ in sources)
        raise InitializeArgumentError(f"DeepScale config given twice ({names}); pass it through exactly one of "
                                      "them.")
    name, value = sources[0]
    from_args = name.startswith("args.")
    if isinstance(value, dict) and not from_args:
        return copy.deepcopy(value)
    if isinstance(value, (str, os.PathLike)) and name != "config_params":
        return load_json_file(value)
    allowed = {"config": "a dict or a path to a JSON file (str or os.PathLike)",
               "config_params": "a dict"}.get(name, "a path to a JSON file (str or os.PathLike)")
    raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}")


def describe_source(config=None, config_params=None, args=None) -> str:
    """A short label for where a config came from: the file path or ``"dict"``."""
    sources = _given_sources(config, config_params, args)
    if len(sources) == 1 and isinstance(sources[0][1], (str, os.PathLike)):
        return os.fspath(sources[0][1])
    return "dict"
