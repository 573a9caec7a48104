"""Reading a setting from text (environment variables, -d URL parameters) as its field's type."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal, get_args, get_origin

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .explain import SECRET_KEYS, render
from .schema import describe, strip_optional, unwrap

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


class TextValueError(ValueError):
    """The text does not fit the field; str() says what was expected and what was found."""


@lru_cache(maxsize=None)
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation, config={"strict": True})


def parse_text(key: str, info: FieldInfo, text: str) -> Any:
    """Convert `text` to the type of field `key`, checking its bounds; raise TextValueError."""
    base, metadata = unwrap(info.annotation, info.metadata)
    if strip_optional(info.annotation)[1] and text.strip() == "":
        return None
    shown = "a value" if key in SECRET_KEYS else render(text)
    try:
        value = _convert(base, text)
    except ValueError:
        raise TextValueError(f"expected {describe(base, metadata)}, found {shown}") from None
    try:
        return _adapter(info.rebuild_annotation()).validate_python(value)
    except ValidationError as error:
        constraint = error.errors()[0]["type"] != "literal_error"
        expected = describe(base, metadata, constraints=constraint)
        raise TextValueError(f"expected {expected}, found {shown}") from None


def _convert(base: Any, text: str) -> Any:
    words = text.strip()
    if base is bool:
        if words.lower() in TRUE_WORDS | FALSE_WORDS:
            return words.lower() in TRUE_WORDS
        raise ValueError(text)
    if base is int:
        return int(words)
    if base is float:
        return float(words)
    if get_origin(base) is Literal:
        return words.lower().replace("-", "_")
    if get_origin(base) is list and get_args(base)[0] is str:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text
