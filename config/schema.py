"""Reading the models as TOML: key names, nested tables, and plain-words descriptions of types."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo

from .fields import LooseSection, Unit


def toml_keys(model: type[BaseModel]) -> dict[str, str]:
    """Map every TOML key a model accepts (names and aliases) to its field name."""
    keys: dict[str, str] = {}
    for name, info in model.model_fields.items():
        keys[primary_key(model, name)] = name
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str):
                    keys.setdefault(choice, name)
        if info.alias:
            keys.setdefault(info.alias, name)
    return keys


def primary_key(model: type[BaseModel], name: str) -> str:
    """The TOML key users write for field `name` (its alias when the name is a Python stand-in)."""
    info = model.model_fields[name]
    return info.alias or name


def strip_optional(annotation: Any) -> tuple[Any, bool]:
    """Remove `| None` from an annotation; return (inner type, was optional)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
    return annotation, False


def unwrap(annotation: Any, metadata: list[Any] = ()) -> tuple[Any, list[Any]]:
    """Peel Optional and Annotated layers; return the bare type and all metadata found."""
    found = list(metadata)
    while True:
        annotation, _ = strip_optional(annotation)
        if get_origin(annotation) is typing.Annotated:
            base, *extra = get_args(annotation)
            for item in extra:
                found.extend(item.metadata if isinstance(item, FieldInfo) else [item])
            annotation = base
            continue
        return annotation, found


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def nested(info: Optional[FieldInfo]) -> Optional[tuple[str, type[BaseModel]]]:
    """("table", Model) or ("array", Model) when the field is a TOML table or array of tables."""
    if info is None:
        return None
    base, _ = unwrap(info.annotation)
    if is_model(base):
        return "table", base
    if get_origin(base) is list:
        item, _ = unwrap(get_args(base)[0])
        if is_model(item):
            return "array", item
    return None


def element(annotation: Any, metadata: list[Any], rest: tuple) -> tuple[Any, list[Any]]:
    """The type found `rest` steps inside a list or dict value (for errors on one element)."""
    base, found = unwrap(annotation, metadata)
    for step in rest:
        origin = get_origin(base)
        if origin is list and isinstance(step, int):
            base, found = unwrap(get_args(base)[0])
        elif origin is dict and isinstance(step, str):
            base, found = unwrap(get_args(base)[1])
        else:
            break
    return base, found


def _bounds(metadata: list[Any]) -> tuple[Any, Any]:
    low = high = None
    for item in metadata:
        if isinstance(item, Ge):
            low = item.ge
        elif isinstance(item, Gt):
            low = item.gt
        elif isinstance(item, Le):
            high = item.le
        elif isinstance(item, Lt):
            high = item.lt
    return low, high


def _unit(metadata: list[Any]) -> Optional[Unit]:
    return next((m for m in metadata if isinstance(m, Unit)), None)


def literal_values(annotation: Any) -> list[str]:
    """The allowed values of a Literal field ([] if it is not one)."""
    base, _ = unwrap(annotation)
    return [str(v) for v in get_args(base)] if get_origin(base) is Literal else []


def describe(annotation: Any, metadata: list[Any] = (), constraints: bool = False) -> str:
    """Plain words for what a value of this type looks like, e.g. "an integer from 1 to 65535"."""
    base, meta = unwrap(annotation, metadata)
    if get_origin(base) is Literal:
        return "one of " + ", ".join(f'"{v}"' for v in get_args(base))
    if base is bool:
        return "true or false"
    if base is int:
        return _describe_int(meta, constraints)
    if base is float:
        return _describe_float(meta, constraints)
    if base is str:
        return (
            "a non-empty string"
            if constraints and any(isinstance(m, MinLen) for m in meta)
            else "a string"
        )
    if get_origin(base) is list:
        inner, _ = unwrap(get_args(base)[0])
        if is_model(inner):
            return "an array of tables"
        return "a list of " + _plural(describe(get_args(base)[0]))
    if get_origin(base) is dict:
        return "a table of " + _plural(describe(get_args(base)[1]))
    if isinstance(base, type) and issubclass(base, LooseSection):
        return "a table"
    if is_model(base):
        return "a table"
    return "an integer or a string"


def _describe_int(meta: list[Any], constraints: bool) -> str:
    unit = _unit(meta)
    words = f"an integer number of {unit.name}" if unit else "an integer"
    if not constraints:
        return words
    low, high = _bounds(meta)
    if low is not None and high is not None:
        return f"{words} from {low} to {high}"
    if low == 0:
        return "a non-negative " + words.removeprefix("an ")
    if low is not None:
        return f"{words} (at least {low})" if unit else f"{words} of at least {low}"
    if high is not None:
        return f"{words} (at most {high})" if unit else f"{words} of at most {high}"
    return words


def _describe_float(meta: list[Any], constraints: bool) -> str:
    low, high = _bounds(meta)
    if constraints and low is not None and high is not None:
        return f"a number from {low} to {high}"
    return "a number"


def _plural(words: str) -> str:
    for single, many in (
        ("an integer or a string", "integers or strings"),
        ("an integer", "integers"),
        ("a string", "strings"),
        ("a number", "numbers"),
        ("a list of numbers", "lists of numbers"),
        ("true or false", "booleans"),
    ):
        if words.startswith(single):
            return many + words[len(single) :]
    return words


@dataclass
class Location:
    """Where a pydantic error points, in TOML terms."""

    table: str  # e.g. "[general]", "[[databases]] #2", "" for the top level
    key: Optional[str]  # the TOML key, None when the error is about a whole table entry
    model: type[BaseModel]  # the model of the table holding `key`
    info: Optional[FieldInfo]  # the field of `key`, None for unknown keys
    rest: tuple = ()  # steps inside the key's value (list indexes, dict keys)
    path: tuple = ()  # loc of the table holding `key` (for pruning)
    section: str = ""  # dotted table name without indexes, e.g. "sharded_tables.mapping"
    tables: list[str] = field(default_factory=list)

    @property
    def dotted(self) -> str:
        """section.key, e.g. "general.port" (the form ACTED_ON uses)."""
        return ".".join(p for p in (self.section, self.key or "") if p)


def locate(root: type[BaseModel], loc: tuple) -> Location:
    """Walk `loc` (a pydantic error location) down the models of `root`."""
    model, tables, names, i = root, [], [], 0
    while i < len(loc):
        step = loc[i]
        keys = toml_keys(model)
        info = model.model_fields.get(keys.get(step, "")) if isinstance(step, str) else None
        kind = nested(info)
        last = i == len(loc) - 1
        if kind is None or last or (kind[0] == "array" and not isinstance(loc[i + 1], int)):
            return Location(
                " ".join(tables),
                str(step),
                model,
                info,
                tuple(loc[i + 1 :]),
                tuple(loc[:i]),
                ".".join(names),
                tables,
            )
        names.append(str(step))
        if kind[0] == "table":
            tables.append(f"[{'.'.join(names)}]")
            i += 1
        else:
            tables.append(f"[[{'.'.join(names)}]] #{loc[i + 1] + 1}")
            i += 2
        model = kind[1]
    return Location(" ".join(tables), None, model, None, (), tuple(loc), ".".join(names), tables)


def tables(root: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """Every table under `root` as ("[general]" / "[[databases]]", model), depth first."""
    found: list[tuple[str, type[BaseModel]]] = []
    for name, info in root.model_fields.items():
        kind = nested(info)
        if kind is None or issubclass(kind[1], LooseSection):
            continue
        dotted = f"{prefix}{primary_key(root, name)}"
        found.append((f"[{dotted}]" if kind[0] == "table" else f"[[{dotted}]]", kind[1]))
        found.extend(tables(kind[1], dotted + "."))
    return found
