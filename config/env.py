"""Environment overrides for [general]: PGHERD_<KEY>, or PGDOG_<KEY> for drop-in use."""

from __future__ import annotations

from typing import Any, Mapping

from .general import General
from .schema import primary_key
from .textvalues import TextValueError, parse_text

# Checked in this order; the first variable that is set wins.
ENV_PREFIXES = ("PGHERD_", "PGDOG_")

# Label used in messages about environment variables (in place of a file name).
ENV_SOURCE = "environment"


def general_overrides(env: Mapping[str, str], errors: list[str]) -> dict[str, Any]:
    """{key: value} for every [general] key set in `env`; bad values go to `errors`."""
    values: dict[str, Any] = {}
    for name, info in General.model_fields.items():
        key = primary_key(General, name)
        var = next((p + key.upper() for p in ENV_PREFIXES if p + key.upper() in env), None)
        if var is None:
            continue
        try:
            values[key] = parse_text(key, info, env[var])
        except TextValueError as error:
            errors.append(f"{ENV_SOURCE}: {var}: {error}")
    return values


def apply(raw: dict, overrides: dict[str, Any]) -> None:
    """Write environment values over the [general] table of a parsed pgherd.toml."""
    if not overrides:
        return
    general = raw.setdefault("general", {})
    if isinstance(general, dict):
        for alias in ("max_pool_size",) if "default_pool_size" in overrides else ():
            general.pop(alias, None)
        general.update(overrides)
