"""Readable errors for config mistakes.

Two kinds of mistakes are reported here:

* keys that no section declares (``find_unknown_keys``), with the closest
  valid key suggested through ``difflib``;
* values of the wrong type or out of range (``describe_validation_error``),
  rewritten from pydantic's error list into one line per problem naming the
  full key path, the value received and what was expected.
"""
import difflib
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from pydantic import BaseModel, ValidationError

from deepscale.config.fields import TYPE_ERROR

# Beyond this many keys a section's key list is too long to print usefully.
_MAX_LISTED_KEYS = 20
_DOCS_HINT = "See docs/config.md for the supported keys."


class FeatureNotAvailableError(ValueError):
    """A config enables a feature that this version of deepscale does not have yet."""


class InitializeArgumentError(ValueError, AssertionError):
    """A wrong combination of arguments to ``deepscale.initialize`` (no model, no config, two configs).

    DeepSpeed checks these with ``assert``, so code written for it catches
    ``AssertionError``; deriving from both keeps that contract while staying a
    ``ValueError`` with a full message, which ``python -O`` cannot strip.
    """


def join_path(path: Sequence[str]) -> str:
    """``("zero_optimization", "stage")`` -> ``"zero_optimization.stage"``."""
    return ".".join(str(p) for p in path)


def nested_model(annotation: Any) -> Optional[Type[BaseModel]]:
    """The config section class inside a field annotation, if any.

    Unwraps ``Optional[...]``, ``Union[...]`` and ``Annotated[...]``.
    """
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = nested_model(arg)
        if found is not None:
            return found
    return None


def accepted_keys(model_cls: Type[BaseModel]) -> Dict[str, str]:
    """Map every accepted key of a section (names and aliases) to its field name."""
    keys = {}
    for name, field in model_cls.model_fields.items():
        keys[name] = name
        if field.alias:
            keys[field.alias] = name
    return keys


def _unknown_key_message(key: str, path: Tuple[str, ...], valid: Sequence[str],
                         model_cls: Type[BaseModel]) -> str:
    where = "(top level)" if not path else (
        f"in section '{join_path(path)}' (full path '{join_path(path + (key,))}')")
    msg = f"Unknown config key '{key}' {where}."
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return f"{msg} Did you mean '{match[0]}'?"
    if "params" in model_cls.model_fields and path:
        # optimizer/scheduler arguments are a common misplacement.
        return f"{msg} Arguments for '{join_path(path)}' belong under '{join_path(path + ('params',))}'."
    if len(valid) <= _MAX_LISTED_KEYS:
        return f"{msg} Valid keys here: {', '.join(sorted(valid))}."
    return f"{msg} {_DOCS_HINT}"


def find_unknown_keys(model_cls: Type[BaseModel], data: Any, path: Tuple[str, ...] = ()) -> List[str]:
    """Messages for every key in ``data`` that ``model_cls`` does not accept.

    Recurses into nested sections. Sections that allow extra keys (free-form
    sections such as ``amp``) only have their declared sub-sections checked.
    Keys given twice under two names (a field name and its alias) are
    reported too, since it would be unclear which one wins.

    Args:
        model_cls: the section class ``data`` is validated against.
        data: the raw value for that section; non-dicts are left to pydantic.
        path: key path of ``data`` from the top level. Default ``()``.
    """
    if not isinstance(data, dict):
        return []
    keys = accepted_keys(model_cls)
    free_form = model_cls.model_config.get("extra") == "allow"
    problems = []
    seen_fields: Dict[str, str] = {}
    for key, value in data.items():
        field_name = keys.get(key)
        if field_name is None:
            if not free_form:
                problems.append(_unknown_key_message(str(key), path, sorted(keys), model_cls))
            continue
        if field_name in seen_fields:
            problems.append(f"Config keys '{join_path(path + (seen_fields[field_name],))}' and "
                            f"'{join_path(path + (key,))}' are two names for the same setting; give only one.")
        seen_fields[field_name] = key
        sub_model = nested_model(model_cls.model_fields[field_name].annotation)
        if sub_model is not None:
            problems.extend(find_unknown_keys(sub_model, value, path + (key,)))
    return problems


def collect_alias_pairs(model_cls: Type[BaseModel], pairs: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Map field names to aliases and back, over a whole tree of sections."""
    pairs = {} if pairs is None else pairs
    for name, field in model_cls.model_fields.items():
        if field.alias and field.alias != name:
            pairs[name] = field.alias
            pairs[field.alias] = name
        sub_model = nested_model(field.annotation)
        if sub_model is not None and sub_model is not model_cls:
            collect_alias_pairs(sub_model, pairs)
    return pairs


def _user_path(loc: Sequence[Any], data: Any, aliases: Dict[str, str], missing: bool) -> str:
    """Rebuild the key path the user wrote from a pydantic error location.

    pydantic locations also contain union member tags and may use a field's
    name where the user wrote its alias; walking the raw data keeps only the
    parts that are real keys.
    """
    parts: List[str] = []
    node = data
    for item in loc:
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, dict) and aliases.get(item) in node:
            parts.append(aliases[item])
            node = node[aliases[item]]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            node = node[item]
    if missing and loc:
        parts.append(str(loc[-1]))
    return join_path(parts)


_JSON_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string",
                    list: "list", tuple: "list", dict: "object", type(None): "null"}

AUTO_HINT = ("'auto' is a placeholder that integrations such as the Hugging Face Trainer replace before the "
             "config reaches the engine; give a concrete value.")


def json_type_name(value: Any) -> str:
    """The JSON name of ``value``'s type (``"string"``, ``"number"``, ...), for messages."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)

_EXPECTED = {
    "model_type": "an object (a JSON dict)",
    "model_attributes_type": "an object (a JSON dict)",
    "dict_type": "an object (a JSON dict)",
    "list_type": "a list",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean (true or false, or 0/1)",
    "bool_parsing": "a boolean (true or false, or 0/1)",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
}

_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _expected(error: Dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == TYPE_ERROR:
        return ctx["expected"]
    if kind in _BOUNDS:
        ctx_key, op = _BOUNDS[kind]
        return f"a value {op} {ctx[ctx_key]}"
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    return _EXPECTED.get(kind, error["msg"])


def _one_error(error: Dict[str, Any], data: Any, aliases: Dict[str, str]) -> str:
    missing = error["type"] == "missing"
    path = _user_path(error["loc"], data, aliases, missing)
    if missing:
        return f"Missing required config key '{path}'."
    if error["type"] == "value_error":
        # Raised by our own cross-field validators; their text is already complete.
        reason = error["msg"].replace("Value error, ", "", 1)
        return f"Invalid config in '{path or 'top level'}': {reason}"
    value = error.get("input")
    msg = (f"Invalid value for config key '{path or 'top level'}': got {value!r} ({json_type_name(value)}); "
           f"expected {_expected(error)}.")
    if value == "auto":
        msg += " " + AUTO_HINT
    return msg


def describe_validation_error(err: ValidationError, data: Any, model_cls: Type[BaseModel]) -> str:
    """Turn a pydantic ``ValidationError`` into one line per problem.

    Args:
        err: the error raised while validating ``data``.
        data: the raw config dict that was validated.
        model_cls: the top-level section class (used to map field names to aliases).
    """
    aliases = collect_alias_pairs(model_cls)
    lines = [_one_error(e, data, aliases) for e in err.errors()]
    return "\n".join(dict.fromkeys(lines))
