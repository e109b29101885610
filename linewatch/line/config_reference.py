"""docs/CONFIG.md, the daemon config reference, generated from the schema in `linewatch.line.config`.

Generated rather than written, so the reference cannot drift from what `load_config` accepts: tests/test_config.py
fails when the committed file differs. Regenerate with `python -m linewatch.line.config_reference > docs/CONFIG.md`.
The helpers that walk the schema (`schema_keys`, `field_at`, `choices`) also let tests hold the commented example
config to the schema.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from linewatch.line import config as schema

REGENERATE = "python -m linewatch.line.config_reference > docs/CONFIG.md"

HEADER = f"""\
# linewatch daemon config reference

Every key of the file that `linewatch run --config FILE` reads, generated from the schema in
`linewatch/line/config.py` by `{REGENERATE}` (do not edit by hand).
A commented example is [config/linewatch.yaml](../config/linewatch.yaml); `linewatch check-config FILE` validates a
file without starting the daemon.

Every key is checked on load. An unknown key, a wrong type (`"5"` is not 5, `1` is not `true`), a value out of range
or a missing file stops the start with the file, the key path and what was expected, for example
`/etc/linewatch/line1.yaml: cameras[0].fps: expected a value >= 0, got int -1`. Relative paths are relative to the
config file's folder. Keys with a default can be left out; `cameras[]` keys belong to each entry of the `cameras`
list.

The file is UTF-8 YAML of at most {schema.MAX_CONFIG_BYTES >> 20} MiB; anchors, aliases and `<<` merges may be
used, but a file whose aliases expand to more than {schema.MAX_YAML_NODES:,} values is refused (a few hundred bytes
can otherwise stand for billions of values). Credentials in a camera `source` (`rtsp://user:password@host/…`,
`?password=…`, `token=…`, GStreamer's `user-id=…`/`user-pw=…`) are shown as `***` wherever linewatch shows a
source: logs, the status topic's `last_error`, `linewatch check-config` and config errors.
"""

_SCALARS = {bool: "true/false", int: "integer", float: "number", str: "string", Path: "path", type(None): "null"}
_BOUNDS = {
    annotated_types.Ge: ("ge", ">="),
    annotated_types.Gt: ("gt", ">"),
    annotated_types.Le: ("le", "<="),
    annotated_types.Lt: ("lt", "<"),
}
_PATH_CHECKS = {schema._existing_dir: "existing folder", schema._existing_file: "existing file"}


def _unwrap(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """The bare type of `Annotated[T, ...]` and the metadata gathered on the way."""
    while typing.get_origin(annotation) is Annotated:
        annotation, *more = typing.get_args(annotation)
        metadata = [*metadata, *more]
    return annotation, metadata


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field (`Model`, `tuple[Model, ...]` or `dict[str, Model]`), None for a value."""
    annotation, _ = _unwrap(annotation, [])
    if typing.get_origin(annotation) is tuple:
        annotation, _ = _unwrap(typing.get_args(annotation)[0], [])
    elif typing.get_origin(annotation) is dict:
        annotation, _ = _unwrap(typing.get_args(annotation)[1], [])
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(_unwrap(annotation, [])[0]) is tuple


def _sub_prefix(path: str, annotation: Any) -> str:
    """Where a section's keys sit: `cameras[].` for a list, `recipes.<name>.` for a mapping by name."""
    if _is_list(annotation):
        return f"{path}[]."
    return f"{path}.<name>." if typing.get_origin(_unwrap(annotation, [])[0]) is dict else f"{path}."


def choices(field: FieldInfo) -> tuple[Any, ...] | None:
    """The allowed values of a field whose type (or list item type) is a Literal; None for any other field."""
    annotation, _ = _unwrap(field.annotation, [])
    if typing.get_origin(annotation) is tuple:
        annotation, _ = _unwrap(typing.get_args(annotation)[0], [])
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """Every key of `model` as (dotted path, field), sections before their keys; list entries as `name[]`."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append((path, field))
        section = _model_of(field.annotation)
        if section is not None:
            keys += schema_keys(section, _sub_prefix(path, field.annotation))
    return keys


def field_at(model: type[BaseModel], path: str) -> FieldInfo | None:
    """The field at a dotted path such as `cameras[].reconnect.max_s`, or None when the schema has no such key."""
    return dict(schema_keys(model)).get(path)


def type_text(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A type as a person writing YAML reads it: `integer >= 1`, `one of fp32, fp16, int8`, `list of string`."""
    annotation, metadata = _unwrap(annotation, list(metadata or []))
    origin = typing.get_origin(annotation)
    if origin is Union:
        members = typing.get_args(annotation)
        text = " or ".join(type_text(arg) for arg in members if arg is not type(None))
        text += ", or null" if type(None) in members else ""
    elif origin is Literal:
        text = "one of " + ", ".join(str(arg) for arg in typing.get_args(annotation))
    elif origin is tuple:
        text = "list of " + type_text(typing.get_args(annotation)[0])
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        text = "mapping"
    else:
        text = _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))
    rules = _constraints(metadata)
    return f"{text} {', '.join(rules)}" if rules else text


def _constraints(metadata: list[Any]) -> list[str]:
    words = []
    for item in metadata:
        for kind, (attr, sign) in _BOUNDS.items():
            if isinstance(item, kind):
                words.append(f"{sign} {getattr(item, attr)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            words.append("(non-empty)")
        func = getattr(item, "func", None)
        check = _PATH_CHECKS.get(func) if callable(func) else None
        if check:
            words.append(f"({check})")
    return words


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return '""' if value == "" else str(value)


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if _model_of(field.annotation) is not None and field.default_factory is not None:
        return "`{}`" if typing.get_origin(_unwrap(field.annotation, [])[0]) is dict else "(section)"
    return f"`{_value_text(field.get_default(call_default_factory=True))}`"


def _row(path: str, field: FieldInfo) -> str:
    meaning = (field.description or "").replace("|", "\\|")
    return f"| `{path}` | {type_text(field.annotation, field.metadata)} | {_default_text(field)} | {meaning} |"


def reference(model: type[BaseModel] = schema.Config) -> str:
    """The whole reference page: a section per top-level key, a table row per key below it."""
    parts = [HEADER]
    for name, field in model.model_fields.items():
        section = _model_of(field.annotation)
        title = f"{name}[]" if _is_list(field.annotation) else name
        required = " (required)" if field.is_required() else ""
        about = field.description or ""
        parts.append(f"\n## `{title}`{required}\n\n{about[:1].upper()}{about[1:]}.\n")
        parts.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        if section is None:
            rows = [(name, field)]
        elif typing.get_origin(_unwrap(field.annotation, [])[0]) is dict:  # the mapping itself, then its entries' keys
            rows = [(name, field), *schema_keys(section, _sub_prefix(name, field.annotation))]
        else:
            rows = schema_keys(section, f"{title}.")
        parts += [_row(path, sub) for path, sub in rows]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
