"""A flat listing of every config key, its default and its status.

Used to write the reference tables in ``docs/config.md`` (``render_markdown``)
and by the test that keeps those docs complete.
"""
import json
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Type

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from deepscale.config.errors import nested_model
from deepscale.config.features import TUNING_ONLY_KEYS, UNAVAILABLE_FEATURES

SUPPORTED = "supported"
EXTENSION = "supported (deepscale extension)"
WARNS = "accepted, warns: no effect yet"
REFUSED = "parsed; enabling it raises FeatureNotAvailableError"
PARSED_ONLY = "parsed only (its feature is not available yet)"

# Keys deepscale adds on top of DeepSpeed's schema.
EXTENSION_KEYS = {"fp16.raise_error_at_min_scale"}

# Keys whose status depends on the value rather than on an on/off switch.
_ABOVE_ONE_REFUSED = "1 supported; larger values raise FeatureNotAvailableError"
STATUS_OVERRIDES = {
    "zero_optimization.stage": "0 supported; 1-3 raise FeatureNotAvailableError",
    "zero_optimization.offload_optimizer.device": "'none' supported; 'cpu'/'nvme' raise FeatureNotAvailableError",
    "zero_optimization.offload_param.device": "'none' supported; 'cpu'/'nvme' raise FeatureNotAvailableError",
    "pipeline.stages": "'auto' and 1 supported; larger values raise FeatureNotAvailableError",
    "tensor_parallel.autotp_size": "0 and 1 supported; larger values raise FeatureNotAvailableError",
    "tensor_parallel.tensor_parallel.tp_size": _ABOVE_ONE_REFUSED,
    "sequence_parallel_size": _ABOVE_ONE_REFUSED,
}


@dataclass(frozen=True)
class KeyInfo:
    """One config key.

    Attributes:
        path: dotted path using field names, e.g. ``zero_optimization.prefetch_bucket_size``.
        alias_path: the same path with DeepSpeed's alternative spellings
            (``zero_optimization.stage3_prefetch_bucket_size``), or None when there are none.
        default: the default value, rendered as text.
        is_section: whether the key holds a nested section.
    """

    path: str
    alias_path: Optional[str]
    default: str
    is_section: bool


def _render_default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, int) and not isinstance(value, bool) and value == sys.maxsize:
        return "sys.maxsize"
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def iter_config_keys(model_cls: Type[BaseModel], prefix: Tuple[str, ...] = (),
                     alias_prefix: Tuple[str, ...] = ()) -> Iterator[KeyInfo]:
    """Yield every key of ``model_cls`` and its sub-sections, depth first."""
    for name, field in model_cls.model_fields.items():
        path, alias_path = prefix + (name,), alias_prefix + (field.alias or name,)
        sub_model = nested_model(field.annotation)
        yield KeyInfo(".".join(path), ".".join(alias_path) if alias_path != path else None,
                      "(section)" if sub_model is not None else _render_default(field), sub_model is not None)
        if sub_model is not None:
            yield from iter_config_keys(sub_model, path, alias_path)


def key_status(path: str) -> str:
    """The status of one key path (field names), as written in the docs."""
    if path in EXTENSION_KEYS:
        return EXTENSION
    if path in STATUS_OVERRIDES:
        return STATUS_OVERRIDES[path]
    for rule in UNAVAILABLE_FEATURES:
        if path == rule.key:
            return REFUSED
    for rule in UNAVAILABLE_FEATURES:
        if path.startswith(rule.scope_path + "."):
            return PARSED_ONLY
    section, _, key = path.rpartition(".")
    top = path.split(".")[0]
    for rule in TUNING_ONLY_KEYS:
        if rule.section == section and (not rule.keys or key in rule.keys) and key not in rule.except_keys:
            return WARNS
        if rule.section and rule.section == top and path != top and not rule.keys:
            second = path.split(".")[1]
            if second not in rule.except_keys:
                return WARNS
    return SUPPORTED


def reference_rows(model_cls: Type[BaseModel]) -> List[Tuple[str, str, str, str]]:
    """``(key, alias path, default, status)`` for every key that is not a section.

    Top-level plain keys come first, then the sections in declaration order.
    """
    infos = [info for info in iter_config_keys(model_cls) if not info.is_section]
    infos.sort(key=lambda info: "." in info.path)  # stable: keeps declaration order within each group
    return [(info.path, info.alias_path or "", info.default, key_status(info.path)) for info in infos]


def render_markdown(model_cls: Type[BaseModel]) -> str:
    """Markdown tables, one per top-level section, for ``docs/config.md``."""
    out: List[str] = []
    current = None
    for key, alias, default, status in reference_rows(model_cls):
        top = key.split(".")[0] if "." in key else ""
        if top != current:
            current = top
            heading = f"`{top}`" if top else "Top-level keys"
            top_alias = alias.split(".")[0] if alias and top and alias.split(".")[0] != top else None
            out.append(f"\n### {heading}" + (f" (also `{top_alias}`)" if top_alias else "") + "\n")
            out.append("| Key | Default | Status |")
            out.append("|---|---|---|")
        name = f"`{key}`" + (f" (also `{alias}`)" if alias else "")
        out.append(f"| {name} | `{default}` | {status} |")
    return "\n".join(out) + "\n"


BEGIN_MARKER = "<!-- BEGIN GENERATED KEY TABLES: python -m deepscale.config.reference --write docs/config.md -->"
END_MARKER = "<!-- END GENERATED KEY TABLES -->"


def replace_generated_section(document: str, tables: str) -> str:
    """Put ``tables`` between the generated-section markers of ``document``."""
    start, end = document.index(BEGIN_MARKER) + len(BEGIN_MARKER), document.index(END_MARKER)
    return document[:start] + "\n" + tables + "\n" + document[end:]


def _main(argv: List[str]) -> int:  # pragma: no cover - doc tooling
    from deepscale.config.config import DeepScaleConfig
    tables = render_markdown(DeepScaleConfig)
    if len(argv) == 2 and argv[0] == "--write":
        with open(argv[1], "r", encoding="utf-8") as handle:
            document = handle.read()
        with open(argv[1], "w", encoding="utf-8") as handle:
            handle.write(replace_generated_section(document, tables))
    else:
        sys.stdout.write(tables)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
