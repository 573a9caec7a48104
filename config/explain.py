"""Turning pydantic validation errors into messages naming the file, table, key and value."""

from __future__ import annotations

import datetime
import difflib
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from .files import PgherdToml, UsersToml
from .general import General
from .schema import Location, describe, element, literal_values, locate, tables, toml_keys

# Values of these keys are never echoed back: messages may end up in shipped logs.
SECRET_KEYS = frozenset(
    {"password", "passwords", "password_hash", "server_password", "datadog_api_key", "token"}
)

# How similar a misspelt key must be to a valid one before we suggest it (difflib ratio).
SUGGESTION_CUTOFF = 0.6

# Long values are cut in messages; a message should fit on a terminal line or two.
MAX_RENDERED = 60

# pydantic error types that mean "right type, value out of bounds".
CONSTRAINT_ERRORS = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "too_short",
        "string_too_short",
        "finite_number",
    }
)

# Our own error types (raised by validators) whose message already says what was expected.
CUSTOM_ERRORS = frozenset({"int_or_str", "password_hash"})

# The tables of both files, for "this key belongs in another table" hints.
ALL_TABLES = tables(PgherdToml) + tables(UsersToml)
FILE_OF_SECTION = {
    **{k: "pgherd.toml" for k in toml_keys(PgherdToml)},
    **{k: "users.toml" for k in toml_keys(UsersToml)},
}


def render(value: Any) -> str:
    """A value the way it looks in TOML: "text", 42, true, [1, 2]."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(render(v) for v in value) + "]"
    elif isinstance(value, (datetime.date, datetime.time)):
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= MAX_RENDERED else text[: MAX_RENDERED - 3] + "..."


def kind_of(value: Any) -> str:
    """What sort of TOML value this is, without showing it (for secrets)."""
    if isinstance(value, bool):
        return "a boolean"
    for python, words in (
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (dict, "a table"),
        (list, "an array"),
    ):
        if isinstance(value, python):
            return words
    return "a date or time"


def found(key: Optional[str], value: Any) -> str:
    return kind_of(value) if key in SECRET_KEYS else render(value)


def closest(word: str, choices: list[str]) -> Optional[str]:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=SUGGESTION_CUTOFF)
    return matches[0] if matches else None


def messages(error: ValidationError, root: type[BaseModel], source: str) -> list[str]:
    """One message per pydantic error, prefixed with `source` (a file name or -d URL)."""
    return [message(err, root, source) for err in error.errors()]


def message(err: dict, root: type[BaseModel], source: str) -> str:
    where = locate(root, err["loc"])
    prefix = f"{source}: {where.table} " if where.table else f"{source}: "
    kind = err["type"]
    if kind == "extra_forbidden":
        return prefix + unknown_key(where, err["input"], root)
    if kind == "missing":
        return prefix + f'missing required key "{where.key}"'
    if where.key is None:
        return f"{source}: {where.table}: expected a table, found {found(None, err['input'])}"
    subject = key_text(where)
    if kind in CUSTOM_ERRORS:
        return prefix + f"{subject}: {err['msg']}, found {found(where.key, err['input'])}"
    if kind in ("value_error", "assertion_error") or where.info is None:
        return prefix + f"{subject}: {err['msg'].removeprefix('Value error, ')}"
    annotation, metadata = element(where.info.annotation, where.info.metadata, where.rest)
    expected = describe(annotation, metadata, constraints=kind in CONSTRAINT_ERRORS)
    if expected == "an array of tables":
        expected += f" ([[{where.dotted}]] entries)"
    text = prefix + f"{subject}: expected {expected}, found {found(where.key, err['input'])}"
    if kind == "literal_error" and isinstance(err["input"], str):
        match = closest(err["input"], literal_values(annotation))
        text += f'; did you mean "{match}"?' if match else ""
    return text


def key_text(where: Location) -> str:
    """The key plus any steps into its value: values (item 3), headers.X-Key."""
    text = where.key or ""
    for step in where.rest:
        text += f" (item {step + 1})" if isinstance(step, int) else f".{step}"
    return text


def unknown_key(where: Location, value: Any, root: type[BaseModel]) -> str:
    key = where.key or ""
    match = closest(key, sorted(toml_keys(where.model)))
    if where.table:
        text = f'unknown key "{key}"' + (f'; did you mean "{match}"?' if match else "")
        elsewhere = _elsewhere(key, where.model)
        return text + (
            f" ({elsewhere})" if match and elsewhere else f"; {elsewhere}" if elsewhere else ""
        )
    noun = _top_level_noun(key, value)
    what = "key" if noun.startswith('"') else "table"
    text = f"unknown top-level {what} {noun}"
    if match:
        return text + f"; did you mean {_top_level_noun(match, value)}?"
    return text + _top_level_hint(key, root)


def _top_level_noun(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"[{key}]"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"[[{key}]]"
    return f'"{key}"'


def _top_level_hint(key: str, root: type[BaseModel]) -> str:
    home = FILE_OF_SECTION.get(key)
    if home and key not in toml_keys(root):
        return f"; it belongs in {home}"
    if root is PgherdToml and key in toml_keys(General):
        return f'; "{key}" is a [general] key: put it below the [general] header'
    elsewhere = _elsewhere(key, root)
    return f"; {elsewhere}" if elsewhere else ""


def _elsewhere(key: str, model: type[BaseModel]) -> str:
    """'"key" is a key of [[databases]]' when the key belongs to other tables, else ""."""
    homes = [label for label, other in ALL_TABLES if other is not model and key in toml_keys(other)]
    return f'"{key}" is a key of {" and ".join(homes)}' if homes else ""
