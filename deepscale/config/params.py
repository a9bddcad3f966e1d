"""Checks for the free-form parts of a config: ``"auto"`` placeholders and constructor arguments.

``optimizer.params`` and ``scheduler.params`` are keyword arguments for a
constructor that only the optimizer and scheduler factories know, and a few
other sections pass extra keys through to another library. Two mistakes would
otherwise surface as a raw ``TypeError`` deep inside torch:

* ``"auto"`` left in the config. It is a placeholder that integrations such as
  the Hugging Face Trainer replace before the config reaches the engine;
  ``find_auto_placeholders`` reports every one the typed sections do not
  already reject, with its key path.
* a value of the wrong kind (``"lr": "abc"``). ``check_call_kwargs`` compares
  each argument with what the constructor's signature says (its default value,
  or a simple annotation) and raises a ``ValueError`` naming
  ``optimizer.params.lr`` and what was expected.

Like the rest of ``deepscale.config`` it imports nothing from the rest of
deepscale, so the factories in ``deepscale.runtime`` can call it.
"""
import inspect
import typing
from typing import Any, Iterator, List, Optional, Tuple, Type

from pydantic import BaseModel

from deepscale.config.errors import AUTO_HINT, json_type_name, nested_model

AUTO = "auto"


def _auto_paths(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _auto_paths(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _auto_paths(item, f"{path}[{index}]")


def find_auto_placeholders(model_cls: Type[BaseModel], data: Any, prefix: str = "") -> List[str]:
    """Key paths holding ``"auto"`` in the free-form parts of ``data``.

    Typed fields are left to validation (which rejects ``"auto"`` where it is
    not a valid value, with the same hint); this finds it where nothing is
    typed: ``Dict``/``Any`` fields such as ``optimizer.params`` and the extra
    keys of pass-through sections.

    Args:
        model_cls: the section class ``data`` is validated against.
        data: the raw value for that section.
        prefix: key path of ``data``. Default ``""`` (top level).
    """
    if not isinstance(data, dict):
        return []
    fields = {}
    for name, field in model_cls.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    found: List[str] = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        field = fields.get(key)
        if field is None:  # an extra key of a pass-through section (unknown keys are refused earlier)
            found.extend(_auto_paths(value, path))
            continue
        sub_model = nested_model(field.annotation)
        if sub_model is not None:
            found.extend(find_auto_placeholders(sub_model, value, path))
        elif isinstance(value, (dict, list)) and _is_free_form(field.annotation):
            found.extend(_auto_paths(value, path))
    return found


def _is_free_form(annotation: Any) -> bool:
    """Whether a field's values are not type checked (``Any`` somewhere inside it)."""
    if annotation is Any:
        return True
    return any(_is_free_form(arg) for arg in typing.get_args(annotation))


def auto_placeholder_message(paths: List[str]) -> str:
    """One error line per ``"auto"`` found, then the hint."""
    lines = [f"Invalid value for config key '{path}': got 'auto' (string)." for path in paths]
    return "\n".join(lines) + "\n" + AUTO_HINT


# --- constructor arguments ------------------------------------------------------------------
_NUMBER = "a number"
_INTEGER = "an integer"
_BOOLEAN = "a boolean (true or false, or 0/1)"
_STRING = "a string"


def _kind_of_default(default: Any) -> Optional[Tuple[str, Any]]:
    """(expected description, element info) from a default value; None when it says nothing."""
    if isinstance(default, bool):
        return _BOOLEAN, None
    if isinstance(default, (int, float)):
        return _NUMBER, None  # 0 as a default does not mean fractions are wrong (SGD momentum=0)
    if isinstance(default, str):
        return _STRING, None
    if isinstance(default, (tuple, list)) and default and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
        return f"a list of {len(default)} numbers", len(default)
    return None


_ANNOTATION_NAMES = {"float": _NUMBER, "int": _INTEGER, "bool": _BOOLEAN, "str": _STRING}


def _kind_of_annotation(annotation: Any) -> Optional[Tuple[str, Any]]:
    """The expected kind from a simple annotation (``float``, ``float | Tensor``, ``'int'``)."""
    if isinstance(annotation, str):
        kind = _ANNOTATION_NAMES.get(annotation.strip())
        return (kind, None) if kind else None
    if annotation in (float, int, bool, str):
        return _ANNOTATION_NAMES[annotation.__name__], None
    args = typing.get_args(annotation)
    if not args or typing.get_origin(annotation) in (tuple, list):
        return None
    kinds = {_ANNOTATION_NAMES.get(getattr(a, "__name__", "")) for a in args} - {None}
    if _NUMBER in kinds or _INTEGER in kinds:
        return (_NUMBER if _NUMBER in kinds else _INTEGER), None
    if kinds == {_BOOLEAN}:
        return _BOOLEAN, None
    return None


def _expected_kind(parameter: inspect.Parameter) -> Optional[Tuple[str, Any]]:
    if parameter.default is not parameter.empty and parameter.default is not None:
        found = _kind_of_default(parameter.default)
        if found is not None:
            return found
    if parameter.annotation is not parameter.empty:
        return _kind_of_annotation(parameter.annotation)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(value: Any, kind: str, length: Any) -> bool:
    if value is None:
        return True  # None is how JSON says "use the default"; the constructor decides
    if kind == _NUMBER:
        return _is_number(value)
    if kind == _INTEGER:
        return _is_number(value) and float(value).is_integer()
    if kind == _BOOLEAN:
        return isinstance(value, bool) or (type(value) is int and value in (0, 1))
    if kind == _STRING:
        return isinstance(value, str)
    return isinstance(value, (list, tuple)) and len(value) == length and all(_is_number(v) for v in value)


def check_call_kwargs(section: str, kwargs: dict, target: Any, skip: Tuple[str, ...] = ()) -> None:
    """Check that each value in ``kwargs`` has the kind ``target``'s signature expects.

    Arguments the signature says nothing usable about (no default, or ``None``,
    and no simple annotation) are left to ``target`` itself. Unknown keys are
    not checked here (the factories refuse them with the accepted list).

    Args:
        section: the config path of ``kwargs``, e.g. ``"optimizer.params"``.
        kwargs: the keyword arguments from the config.
        target: the class or function they will be passed to.
        skip: keys not to check. Default ``()``.

    Raises:
        ValueError: one line per argument of the wrong kind (or ``"auto"``), naming
            ``<section>.<key>``, the value and what is expected.
    """
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: nothing to compare with
        return
    parameters = signature.parameters
    problems = []
    for key, value in kwargs.items():
        if key in skip or key not in parameters:
            continue
        expected = _expected_kind(parameters[key])
        is_auto = isinstance(value, str) and value.strip().lower() == AUTO
        if expected is None and not is_auto:
            continue
        if expected is not None and _matches(value, *expected) and not is_auto:
            continue
        line = f"Invalid value for config key '{section}.{key}': got {value!r} ({json_type_name(value)})"
        line += f"; expected {expected[0]}." if expected is not None else "."
        if is_auto:
            line += " " + AUTO_HINT
        problems.append(line)
    if problems:
        raise ValueError("\n".join(problems))
