"""A flat listing of every config key, its default and its status.

Used to write the reference tables in ``docs/config.md`` (``render_markdown``)
and by the test that keeps those docs complete.
"""
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Type

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from deepscale.config.errors import nested_model
from deepscale.config import features
from deepscale.config.features import TuningOnlyKeys, UnavailableFeature, refusal_message

SUPPORTED = "supported"
EXTENSION = "supported (deepscale extension)"
WARNS = "accepted, warns: no effect yet"
REFUSED = "parsed; enabling it raises FeatureNotAvailableError"
PARSED_ONLY = "parsed only (its feature is not available yet)"

# Keys deepscale adds on top of DeepSpeed's schema.
EXTENSION_KEYS = {"fp16.raise_error_at_min_scale", "zero_optimization.debug_sequence_check",
                  "zero_optimization.watchdog_timeout", "collective_watchdog.timeout", "collective_watchdog.action"}

ZERO_STAGES = (0, 1, 2, 3)


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


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)


def _list(values: Sequence[Any]) -> str:
    shown = [_show(v) for v in values]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def _stages(stages: Sequence[int]) -> str:
    """``[1, 2, 3]`` -> ``"stages 1-3"``; ``[0, 3]`` -> ``"stages 0, 3"``; ``[2]`` -> ``"stage 2"``."""
    stages = sorted(stages)
    if len(stages) == 1:
        return f"stage {stages[0]}"
    if stages == list(range(stages[0], stages[-1] + 1)):
        return f"stages {stages[0]}-{stages[-1]}"
    return "stages " + ", ".join(map(str, stages))


def _refusal_status(rules: List[UnavailableFeature]) -> str:
    """Which example values the rules accept and which they refuse, asked of the rules themselves."""
    values = [v for rule in rules for v in rule.values]
    if not values:
        return REFUSED
    refused = [v for v in values if any(rule.enabled(v) for rule in rules)]
    if not refused:
        return f"{_list(values)} supported"
    when = " ".join(rule.when for rule in rules if rule.when)
    # A conditional refusal leaves every value supported elsewhere.
    supported = SUPPORTED if when else f"{_list([v for v in values if v not in refused])} supported"
    verb = "raises" if len(refused) == 1 else "raise"
    return f"{supported}; {_list(refused)}{' ' + when if when else ''} {verb} FeatureNotAvailableError"


def _covering_rules(path: str) -> List[TuningOnlyKeys]:
    """The no-effect rules covering ``path`` (field names; a rule's key covers its whole subtree)."""
    found = []
    for rule in features.TUNING_ONLY_KEYS:
        if rule.section and not path.startswith(rule.section + "."):
            continue
        rest = path[len(rule.section) + 1:] if rule.section else path
        if rest and rule.covers(rule.section, rest.split(".")[0]):
            found.append(rule)
    return found


def _ignored_at(path: str) -> List[int]:
    """The ZeRO stages at which ``path`` is accepted without effect (all of them: every stage)."""
    rules = _covering_rules(path)
    if any(rule.zero_stages is None for rule in rules):
        return list(ZERO_STAGES)
    return sorted({stage for rule in rules for stage in rule.zero_stages})


def key_status(path: str) -> str:
    """The status of one key path (field names), as written in the docs.

    Everything is read from the tables in ``features.py``, so the docs cannot
    claim more (or less) than the code does.
    """
    status = _availability(path)
    if path in EXTENSION_KEYS:
        return EXTENSION if status == SUPPORTED else f"(deepscale extension) {status}"
    return status


def _availability(path: str) -> str:
    rules = [rule for rule in features.UNAVAILABLE_FEATURES if rule.key == path]
    if not rules and any(path.startswith(rule.scope_path + ".") for rule in features.UNAVAILABLE_FEATURES):
        return PARSED_ONLY
    status = _refusal_status(rules) if rules else SUPPORTED
    ignored = _ignored_at(path)
    if len(ignored) == len(ZERO_STAGES):
        return WARNS if status == SUPPORTED else f"{status}; otherwise {WARNS}"
    if not ignored:
        return status
    if status == SUPPORTED:
        used = [stage for stage in ZERO_STAGES if stage not in ignored]
        return f"supported at ZeRO {_stages(used)}; at {_stages(ignored)} accepted, warns: no effect"
    return f"{status}; at ZeRO {_stages(ignored)} accepted, warns: no effect"


def reference_rows(model_cls: Type[BaseModel]) -> List[Tuple[str, str, str, str]]:
    """``(key, alias path, default, status)`` for every key that is not a section.

    Top-level plain keys come first, then the sections in declaration order.
    """
    infos = [info for info in iter_config_keys(model_cls) if not info.is_section]
    infos.sort(key=lambda info: "." in info.path)  # stable: keeps declaration order within each group
    return [(info.path, info.alias_path or "", info.default, key_status(info.path)) for info in infos]


def _refused_example(rule: UnavailableFeature) -> Any:
    """A value of ``rule.key`` the rule refuses, or None when nothing is refused."""
    for value in rule.values or (True,):
        if rule.enabled(value):
            return value
    return None


def render_availability() -> str:
    """Markdown: every feature a config can ask for that is not built yet, from ``features.UNAVAILABLE_FEATURES``."""
    out = ["\n### Features that are not available yet\n",
           "Asking for one of these stops `initialize` with a `FeatureNotAvailableError` (a `ValueError`) "
           "naming the key, for example:\n"]
    rows, example = [], None
    for rule in features.UNAVAILABLE_FEATURES:
        value = _refused_example(rule)
        if value is None:
            continue  # built: every example value is accepted
        if example is None:
            example = refusal_message(rule, value)
        key = rule.label or rule.key
        feature = rule.feature(value) if callable(rule.feature) else rule.feature
        hint = rule.hint(value) if callable(rule.hint) else rule.hint
        rows.append(f"| `{key}`{' ' + rule.when if rule.when else ''} | {feature} | {hint} |")
    out.append(f"```\n{example}\n```\n" if example else "(none)\n")
    out.extend(["| Setting | Needs | How to run without it |", "|---|---|---|", *rows])
    return "\n".join(out) + "\n"


def render_markdown(model_cls: Type[BaseModel]) -> str:
    """The generated part of ``docs/config.md``: the availability list, then one key table per section."""
    out: List[str] = [render_availability()]
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
