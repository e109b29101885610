"""One way to validate structured input: pydantic models, and one adapter from pydantic's errors to ours.

Every file or message linewatch reads (daemon config, training settings, calibration file, wire headers, trigger
requests) is a pydantic model, and every refusal reads the same way, naming the source and the key:
`FILE: key.path: expected …, got …`. Two bases say how strict a schema is:

- `StrictModel` for files that are ours to write (daemon config, training settings): an unknown key is refused,
  because a typo in a key would otherwise silently leave a default in force on an unattended line.
- `TolerantModel` for formats whose documents promise additive fields (calibration file, wire headers): unknown
  keys are ignored, so a newer writer never breaks an older reader.

Schemas declare scalars with pydantic's strict types (`StrictInt`, `StrictFloat`, `StrictBool`, `StrictStr`, or
`Field(strict=True)`): no "5" for 5 and no 1 for true, because a config that only works because a string was
coerced will be misread by a person. Containers stay lax (a YAML/JSON list fills a tuple; a string fills a Path).
A model's own checks raise `expected(...)` / `Problem` (a ValueError that may point at a key below the model), so
cross-field refusals read like pydantic's own.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from linewatch.errors import ConfigError, LinewatchError

M = TypeVar("M", bound=BaseModel)
_NOTHING = object()

# pydantic error types -> what we say was expected (the rest fall back to pydantic's own message)
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true/false",
    "bool_parsing": "true/false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "path_type": "a path",
    "none_required": "null",
}


class Problem(ValueError):
    """What a model's own check found, at `at` (a key path below the field or model whose validator raised it).

    Cross-field checks run on a whole model, but the person has to edit one key: `at` lets a check on `Config` say
    `cameras[1].name` instead of `<top level>`."""

    def __init__(self, text: str, at: tuple[str | int, ...] = ()):
        super().__init__(text)
        self.text = text
        self.at = at


def expected(what: str, got: Any = _NOTHING, at: tuple[str | int, ...] = ()) -> Problem:
    """`expected WHAT, got TYPE VALUE` (at `at`), the wording of every other refusal."""
    return Problem(f"expected {what}" + ("" if got is _NOTHING else f", got {show_value(got)}"), at)


class StrictModel(BaseModel):
    """A schema for a file we write: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TolerantModel(BaseModel):
    """A schema for a format with additive fields: unknown keys ignored, values frozen."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def validate(
    model: type[M],
    data: Any,
    source: object,
    error: type[LinewatchError] = ConfigError,
    context: dict[str, Any] | None = None,
) -> M:
    """`model` built from `data`, or `error` with the first problem as `SOURCE: key.path: expected …, got …`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise error(describe_error(exc, source, model)) from None
    except RecursionError:
        raise error(f"{source}: nested too deeply to be a valid document") from None


def describe_error(exc: ValidationError, source: object, model: type[BaseModel] | None = None) -> str:
    """The first of pydantic's errors in our words (one problem at a time is what a person fixes)."""
    errors = exc.errors(include_url=False)
    loc = _person_loc(errors[0]["loc"])
    loc, what = _own_words(errors[0], loc, model) or (loc, _expected_got(errors, loc))
    # a model's own check may quote a value in its words (a path made from a URL): hide credentials there too
    return redact_source(f"{source}: {key_path(loc) or '<top level>'}: {what}")


def _person_loc(loc: tuple[Any, ...]) -> list[Any]:
    return [part for part in loc if not _is_union_tag(part)]


def _own_words(err: ErrorDetails, loc: list[Any], model: type[BaseModel] | None) -> tuple[list[Any], str] | None:
    """(where, what) for refusals that are not `expected …, got …`: unknown and missing keys, a model's own checks."""
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1]) if model is not None else []
        return loc, "unknown key" + (f" (known keys here: {', '.join(known)})" if known else "")
    if kind == "missing":
        return loc, "required key missing"
    if kind in ("value_error", "assertion_error"):
        problem = (err.get("ctx") or {}).get("error", err["msg"])
        if isinstance(problem, Problem):
            return [*loc, *problem.at], problem.text
        return loc, str(problem)
    return None


def _expected_got(errors: list[ErrorDetails], loc: list[Any]) -> str:
    err = errors[0]
    # a union's members fail one by one at the same place: say what any of them would have accepted
    alike = [e for e in errors if _person_loc(e["loc"]) == loc and e["type"] in _EXPECTED]
    if len(alike) > 1:
        expected = " or ".join(dict.fromkeys(_EXPECTED[e["type"]] for e in alike))
    else:
        expected = _expected(err["type"], err.get("ctx") or {}, err["msg"])
    return f"expected {expected}, got {show_value(err.get('input'))}"


def key_path(loc: list[Any] | tuple[Any, ...]) -> str:
    """`cameras[0].reconnect.max_s` from pydantic's location tuple."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def show_value(value: Any) -> str:
    """A value as a person would recognise it in their file: type and a short repr, credentials hidden.

    Bounded: the value may be a hostile document (a YAML alias bomb, a 5000-digit integer, deep nesting), so
    containers are shown only a few items and levels deep, and nothing is formatted in full just to be cut."""
    text = repr(redact_source(value)) if isinstance(value, str) else redact_source(_SHORT_REPR.repr(value))
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, hiding credentials in strings before they are cut (a cut could drop the `@` that
    marks a password as one) and naming integers too long for Python to print."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 60, 200
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 8

    def repr_str(self, x: str, level: int) -> str:
        text = repr(redact_source(x))
        return text if len(text) <= self.maxstring else text[: self.maxstring - 3] + "..."

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # more digits than sys.get_int_max_str_digits() allows to print
            return f"<integer of {x.bit_length()} bits>"


_SHORT_REPR = _ShortRepr()


# --- credentials in camera sources ------------------------------------------------------------------------------

_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://")
_TOKEN_END = re.compile(r"[\s'\"<>]")
# `user:password@host` without a scheme (a URL whose `rtsp://` was forgotten), at the start of a word
_BARE_USERINFO = re.compile(r"(?:(?<=[\s'\"<>=(\[,])|^)[\w.%+~-]{1,64}:(?!//)[^\s'\"<>@]{0,256}@")
# a key that names a credential (`password`, `pwd`, `token`, `apikey`, `user`, GStreamer's `user-pw`, `proxy-id`, ...)
# followed by `=`: in a URL query (`?user=admin&password=x`) or a GStreamer pipeline (`user-pw="x y"`)
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>(?:pass|pwd|pw|token|secret|auth|key|cred|signature|user|usr|login|uid|proxy[-_]id)[\w.-]{0,32})"
    r"(?P<eq>\s*=\s*)(?P<value>\"(?:[^\"\\]|\\.)*\"?|'[^']*'?|[^\s&;#'\"]*)"
)
REDACTED = "***"


def redact_source(text: str) -> str:
    """`text` (a camera source, or a message quoting one) with its credentials replaced by `***`.

    URL userinfo (`rtsp://admin:S3cret@host/s` -> `rtsp://***@host/s`, up to the last `@` of the word, so an
    unencoded `@` in a password is hidden too; also `admin:S3cret@host` without a scheme) and the values of
    credential-looking query parameters and GStreamer properties (`?password=…`, `&token=…`, `user-id=…`,
    `user-pw=…`; case-insensitive). Errs on the side of hiding: a log line, a status message or an error may be
    read by anyone on the line, a password never. Linear in the length of `text`, which may come from a hostile
    document."""
    return _SECRET_PARAM.sub(_hide_value, _BARE_USERINFO.sub(REDACTED + "@", _redact_userinfo(text)))


def _hide_value(match: re.Match[str]) -> str:
    return match["key"] + match["eq"] + (REDACTED if match["value"] else "")


def _redact_userinfo(text: str) -> str:
    parts: list[str] = []
    done = 0  # text[:done] is in parts
    for scheme in _SCHEME.finditer(text):
        if scheme.start() < done:
            continue  # inside a word already handled
        end_match = _TOKEN_END.search(text, scheme.end())
        end = len(text) if end_match is None else end_match.start()
        at = text.rfind("@", scheme.end(), end)
        parts.append(text[done : scheme.end()] if at >= 0 else text[done:end])
        if at >= 0:
            parts.append(REDACTED)
        done = at if at >= 0 else end
    parts.append(text[done:])
    return "".join(parts)


def _expected(kind: str, ctx: dict[str, Any], msg: str) -> str:
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return "one of " + str(ctx.get("expected", "")).replace(" or ", ", ")
    if kind == "enum":
        return "one of " + str(ctx.get("expected", "")).replace(" or ", ", ")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"a value {op} {bound:g}" if isinstance(bound, float) else f"a value {op} {bound}"
    if kind == "too_short":
        return "a non-empty list" if ctx.get("min_length") == 1 else f"at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} item(s)"
    if kind == "string_too_short":
        return "a non-empty string" if ctx.get("min_length") == 1 else f"at least {ctx.get('min_length')} characters"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"text matching {ctx.get('pattern')}"
    return msg[0].lower() + msg[1:] if msg else kind


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the tried union member's type name into the location; a person's file has no such key."""
    return isinstance(part, str) and (
        part.endswith("]")
        or part
        in (
            "int",
            "str",
            "float",
            "bool",
            "none",
            "function-after",
            "function-before",
            "function-plain",
            "function-wrap",
            "lax-or-strict",
            "is-instance[Path]",
        )
    )


def _known_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """Field names of the (nested) model at `loc`, for the unknown-key message."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `Model`, `tuple[Model, ...]` or `Model | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
