"""Loading: read both files, apply environment and -d URLs, validate, check, report all errors."""

from __future__ import annotations

import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from pydantic import BaseModel, ValidationError

from . import checks
from . import env as envmod
from . import urls as urlmod
from .databases import Database
from .errors import ConfigError
from .explain import messages
from .files import PgherdToml, UsersToml
from .model import Config
from .schema import locate
from .users import User

DEFAULT_CONFIG_FILE = "pgherd.toml"
DEFAULT_USERS_FILE = "users.toml"

# After reporting a file's errors we drop the bad keys and validate again, so the checks
# across files still run on the good parts; a second round is enough in practice.
PRUNE_ROUNDS = 3

_TOML_POSITION = re.compile(r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")

PathArg = Union[str, Path, None]


def load_config(
    config_path: PathArg = None,
    users_path: PathArg = None,
    database_urls: Iterable[str] = (),
    env: Optional[Mapping[str, str]] = None,
) -> Config:
    """Load pgherd.toml and users.toml (defaults: in the current directory) into a Config.

    `database_urls` (-d) replace every [[databases]] entry and add their users; `env`
    (default os.environ) supplies PGHERD_<KEY> / PGDOG_<KEY> overrides for [general].
    Raises ConfigError listing every problem found.
    """
    env = os.environ if env is None else env
    urls = list(database_urls)
    errors: list[str] = []
    tainted: set[str] = set()
    config_file, config_raw = _read(
        config_path, DEFAULT_CONFIG_FILE, "-c", bool(urls), errors, tainted
    )
    users_file, users_raw = _read(users_path, DEFAULT_USERS_FILE, "-u", bool(urls), errors, tainted)
    envmod.apply(config_raw, envmod.general_overrides(env, errors))
    config_toml = _validate(PgherdToml, config_raw, config_file, errors, tainted) or PgherdToml()
    users_toml = _validate(UsersToml, users_raw, users_file, errors, tainted) or UsersToml()
    config = _assemble(config_toml, users_toml, config_file, users_file)
    context = checks.Context(config_file, users_file, tainted)
    if urls:
        _apply_urls(config, urls, env, errors, context)
    errors += checks.run(config, context)
    if errors:
        raise ConfigError(errors)
    return config


def _read(
    path: PathArg, default: str, flag: str, urls_given: bool, errors: list[str], tainted: set[str]
) -> tuple[str, dict]:
    """(label for messages, parsed TOML); {} if the file may be and is missing."""
    label = str(path) if path is not None else default
    file = Path(path) if path is not None else Path.cwd() / default
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path is None and urls_given:
            return label, {}
        errors.append(_missing(label, file, path is None, flag))
    except UnicodeDecodeError as error:
        errors.append(f"{label}: not valid UTF-8 text (byte {error.start})")
    except OSError as error:
        errors.append(f"{label}: cannot read: {error.strerror or error}")
    else:
        try:
            return label, tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            errors.append(_syntax(label, str(error)))
    tainted.add(checks.file_taint(label))
    return label, {}


def _missing(label: str, file: Path, defaulted: bool, flag: str) -> str:
    if not defaulted:
        return f"{label}: file not found"
    return (
        f"{label}: file not found in {file.parent}; pass {flag} PATH, or -d "
        "postgres://user:password@host:port/database to run without it"
    )


def _syntax(label: str, text: str) -> str:
    match = _TOML_POSITION.match(text)
    if match:
        return (
            f"{label}: line {match['line']}, column {match['column']}: "
            f"TOML syntax error: {match['what']}"
        )
    return f"{label}: TOML syntax error: {text}"


def _validate(
    model: type[BaseModel], raw: dict, label: str, errors: list[str], tainted: set[str]
) -> Optional[BaseModel]:
    """Validate; on failure report every error, then retry without the offending keys."""
    for round_ in range(PRUNE_ROUNDS):
        try:
            return model.model_validate(raw)
        except ValidationError as error:
            if round_ == 0:
                errors.extend(messages(error, model, label))
            raw = _prune(raw, error, model, tainted)
    tainted.add(checks.file_taint(label))
    return None


_GONE = object()


def _prune(raw: dict, error: ValidationError, model: type[BaseModel], tainted: set[str]) -> dict:
    """A copy of `raw` without the keys (or whole table entries) the errors point at."""
    raw = copy.deepcopy(raw)
    for err in error.errors():
        where = locate(model, err["loc"])
        whole_entry = err["type"] == "missing" or where.key is None
        target = where.path if whole_entry else err["loc"][: len(where.path) + 1]
        if where.table or err["type"] != "extra_forbidden":
            # An unknown top-level table says nothing about the known ones: no taint.
            tainted.add(where.section if whole_entry else where.dotted)
        _mark(raw, target)
    return _sweep(raw)


def _mark(raw: Any, path: tuple) -> None:
    if not path:
        return
    node = raw
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
    try:
        node[path[-1]] = _GONE
    except (KeyError, IndexError, TypeError):
        pass


def _sweep(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _sweep(v) for k, v in node.items() if v is not _GONE}
    if isinstance(node, list):
        return [_sweep(v) for v in node if v is not _GONE]
    return node


def _assemble(
    config_toml: PgherdToml, users_toml: UsersToml, config_file: str, users_file: str
) -> Config:
    """Config from the two validated files, keeping track of which keys were set."""
    values = {name: getattr(config_toml, name) for name in PgherdToml.model_fields}
    fields_set = set(config_toml.model_fields_set)
    values["users"] = users_toml.users
    if users_toml.admin is not None:
        # As in PgDog, an [admin] table in users.toml replaces the one in pgdog.toml.
        values["admin"] = users_toml.admin
        fields_set.add("admin")
    fields_set |= {"users", "config_path", "users_path"}
    return Config.model_construct(
        _fields_set=fields_set, **values, config_path=config_file, users_path=users_file
    )


def _apply_urls(
    config: Config,
    urls: list[str],
    env: Mapping[str, str],
    errors: list[str],
    context: checks.Context,
) -> None:
    """-d URLs replace all [[databases]] and add (or replace) one user each."""
    databases: dict[tuple, Database] = {}
    users: dict[tuple, User] = {}
    for url in urls:
        parsed = urlmod.parse(url, env, errors)
        source = f"-d {urlmod.masked(url)}"
        database = parsed and _validate(Database, parsed[0], source, errors, context.tainted)
        user = parsed and _validate(User, parsed[1], source, errors, context.tainted)
        if database is None or user is None:
            context.tainted.add("databases")
            continue
        key = (database.name, database.shard, database.host, database.port, database.role)
        databases.setdefault(key, database)
        if users.setdefault((user.name, user.database), user) is user:
            context.user_sources[id(user)] = source
    config.databases = list(databases.values())
    kept = [u for u in config.users if (u.name, u.database) not in users]
    config.users = kept + list(users.values())
