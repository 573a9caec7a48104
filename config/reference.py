"""Reference of every modeled key; `python -m pgherd.config.reference` prints the docs table."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .acted_on import ACTED_ON
from .fields import DISABLED_MS, UNLIMITED, LooseSection
from .files import PgherdToml, UsersToml
from .general import default_workers
from .schema import describe, nested, primary_key, unwrap


def all_keys() -> list[tuple[str, str, str]]:
    """(section.key, type in words, default) for every key of both files, in model order."""
    rows: list[tuple[str, str, str]] = []
    for root in (PgherdToml, UsersToml):
        for name, info in root.model_fields.items():
            kind = nested(info)
            section = primary_key(root, name)
            if kind and issubclass(kind[1], LooseSection):
                rows.append((f"{section}.*", "any keys", "—"))
            elif kind and not (root is UsersToml and section == "admin"):
                rows.extend(_rows(kind[1], section))
    return rows


def _rows(model: type[BaseModel], section: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, info in model.model_fields.items():
        key = f"{section}.{primary_key(model, name)}"
        rows.append((key, _type(info), _default(info)))
        kind = nested(info)
        if kind:
            rows.extend(_rows(kind[1], key))
    return rows


def _type(info) -> str:
    base, metadata = unwrap(info.annotation, info.metadata)
    return describe(base, metadata, constraints=True)


def _default(info) -> str:
    if info.default_factory is default_workers:
        return "number of CPU cores"
    if info.default_factory is not None:
        return _show(info.default_factory())
    if info.default is PydanticUndefined:
        return "required"
    return _show(info.default)


def _show(value: Any) -> str:
    if value is None:
        return "not set"
    if value is DISABLED_MS or value == DISABLED_MS:
        return "disabled"
    if value == UNLIMITED:
        return "unlimited"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, BaseModel):
        return "(table)"
    if isinstance(value, (list, dict)):
        return "empty" if not value else repr(value)
    return f"{value:_}" if isinstance(value, int) and value >= 10_000 else str(value)


def not_acted_on_table() -> str:
    """Markdown table of keys accepted but not acted on yet."""
    lines = ["| key | type | default |", "|---|---|---|"]
    for key, words, default in all_keys():
        if key not in ACTED_ON:
            lines.append(f"| `{key}` | {words} | {default} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(not_acted_on_table())
