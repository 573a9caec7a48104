"""-d/--database-url: postgres://user:pass@host:port/db as a [[databases]] entry plus a user."""

from __future__ import annotations

from typing import Any, Mapping, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

from .databases import Database
from .explain import closest
from .schema import toml_keys
from .textvalues import TextValueError, parse_text

SCHEMES = ("postgres", "postgresql")

# What PgDog (and libpq) assume when the URL leaves them out.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5432
DEFAULT_DATABASE = "postgres"
DEFAULT_USER = "postgres"

# Set from the URL itself, so not accepted as ?key=value parameters.
URL_KEYS = frozenset({"name", "host", "port"})


def masked(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def parse(url: str, env: Mapping[str, str], errors: list[str]) -> Optional[tuple[dict, dict]]:
    """(database table, user table) as raw TOML-like dicts, or None after adding to `errors`."""
    source = f"-d {masked(url)}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        errors.append(
            f"{source}: not a valid URL ({error}); expected postgres://user:password@host:port/database"
        )
        return None
    if parts.scheme not in SCHEMES:
        errors.append(f"{source}: expected a postgres:// or postgresql:// URL")
        return None
    name = unquote(parts.path.lstrip("/")) or DEFAULT_DATABASE
    if "/" in name:
        errors.append(
            f'{source}: database name "{name}" contains "/"; expected postgres://user:password@host:port/database'
        )
        return None
    database: dict[str, Any] = {"name": name, "host": parts.hostname or DEFAULT_HOST}
    database["port"] = port if port is not None else DEFAULT_PORT
    if not _query(parts.query, database, source, errors):
        return None
    user: dict[str, Any] = {
        "name": unquote(parts.username or "") or env.get("USER") or DEFAULT_USER
    }
    user["database"] = name
    if parts.password is not None:
        user["password"] = unquote(parts.password)
    return database, user


def _query(query: str, database: dict, source: str, errors: list[str]) -> bool:
    """Copy ?key=value parameters (any [[databases]] key) into `database`."""
    keys = toml_keys(Database)
    ok = True
    for key, text in parse_qsl(query, keep_blank_values=True):
        if key not in keys or key in URL_KEYS:
            match = closest(key, sorted(set(keys) - URL_KEYS))
            hint = f'; did you mean "{match}"?' if match else ""
            errors.append(f'{source}: unknown parameter "{key}"{hint}')
            ok = False
            continue
        try:
            database[key] = parse_text(key, Database.model_fields[keys[key]], text)
        except TextValueError as error:
            errors.append(f"{source}: parameter {key}: {error}")
            ok = False
    return ok
