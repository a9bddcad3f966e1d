"""Value types shared by every config section.

JSON has few value types, so we give each one a single meaning and reject
anything else instead of guessing:

* ``Int`` accepts JSON integers and integral numbers written with an exponent
  (``5e8`` is a common way to write bucket sizes); it rejects booleans, strings
  and fractions.
* ``Float`` accepts any JSON number, but not booleans or strings.
* ``Bool`` accepts ``true``/``false`` and the integers ``0``/``1`` (DeepSpeed
  reads its config with plain Python truthiness, so configs written as
  ``"zero_allow_untested_optimizer": 1`` exist in the wild). Other integers,
  and strings such as ``"false"`` (which plain Python would read as truthy),
  are rejected.
* ``Str`` accepts only strings.
* ``choice(...)`` builds a string type with a fixed set of allowed values,
  matched case-insensitively and normalised to the canonical spelling.

Type failures are raised as a ``PydanticCustomError`` of type ``TYPE_ERROR``
whose context holds a human description of what was expected; ``errors.py``
turns it into a message naming the key path.
"""
from typing import Any, Dict, Iterable, Optional, Union

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

try:  # Python >= 3.9 ships Annotated in typing.
    from typing import Annotated
except ImportError:  # pragma: no cover - only for very old interpreters
    from typing_extensions import Annotated

TYPE_ERROR = "deepscale_type"


def type_error(expected: str) -> PydanticCustomError:
    """Build the error raised when a value does not have the expected type."""
    return PydanticCustomError(TYPE_ERROR, "expected {expected}", {"expected": expected})


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise type_error("an integer")
    if isinstance(value, int):
        return value
    # Accept 5e8 / 1e9 style notation, which JSON parses as a float.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise type_error("an integer")


def _as_int_or_never(value: Any):
    # DeepSpeed clients write float("inf") for "never" (Accelerate does for steps_per_print).
    if isinstance(value, float) and value == float("inf"):
        return None
    return _as_int(value)


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error("a number")
    return float(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # 0/1 only: 2 or 0.5 is more likely a value meant for another key than a switch.
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise type_error("a boolean (true or false, or 0/1)")


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise type_error("a string")


Int = Annotated[int, BeforeValidator(_as_int)]
Float = Annotated[float, BeforeValidator(_as_float)]
Bool = Annotated[bool, BeforeValidator(_as_bool)]
# An interval where infinity means "never"; stored as None.
IntOrNever = Annotated[Optional[int], BeforeValidator(_as_int_or_never)]
Str = Annotated[str, BeforeValidator(_as_str)]


def _describe_choices(allowed: Iterable[str]) -> str:
    return "one of " + ", ".join(repr(a) for a in allowed)


def choice(*allowed: str, upper: bool = False, aliases: Optional[Dict[str, str]] = None):
    """A string type restricted to ``allowed``.

    Args:
        allowed: canonical spellings, e.g. ``"fp16", "bf16", "fp32"``.
        upper: compare and normalise in upper case instead of lower case
            (DeepSpeed writes checkpoint validation modes as ``WARN``). Default False.
        aliases: extra accepted spellings mapped to a canonical value,
            e.g. ``{"float16": "fp16"}``. Default None.

    Returns:
        An ``Annotated[str, ...]`` usable as a pydantic field type; validated
        values are the canonical spelling.
    """
    canon = {(a.upper() if upper else a.lower()): a for a in allowed}
    for alias, target in (aliases or {}).items():
        canon[alias.upper() if upper else alias.lower()] = target
    expected = _describe_choices(allowed)

    def _check(value: Any) -> str:
        if not isinstance(value, str):
            raise type_error(expected)
        key = value.upper() if upper else value.lower()
        if key not in canon:
            raise type_error(expected)
        return canon[key]

    return Annotated[str, BeforeValidator(_check)]


def _as_auto_or_int(value: Any):
    if value == "auto":
        return value
    try:
        return _as_int(value)
    except PydanticCustomError:
        raise type_error("an integer or 'auto'") from None


# Keys where DeepSpeed accepts either a number or the word "auto".
AutoOrInt = Annotated[Union[int, str], BeforeValidator(_as_auto_or_int)]

# Spellings DeepSpeed accepts for dtypes, mapped to our canonical short names.
DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
}

DtypeName = choice("fp32", "fp16", "bf16", aliases=DTYPE_ALIASES)
