"""Checks across keys and files that the per-table models cannot make on their own."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Config
from .users import User, password_hash_kind


@dataclass
class Context:
    """What the checks need besides the config: file labels and which parts failed to load."""

    config_file: str
    users_file: str
    # Dotted names ("general.auth_type", "users") and files ("file:users.toml") whose values
    # were unusable; checks that depend on them are skipped to avoid follow-on errors.
    tainted: set[str] = field(default_factory=set)
    # Users that came from -d URLs, by id(), mapped to the label naming their URL.
    user_sources: dict[int, str] = field(default_factory=dict)

    @property
    def config_taint(self) -> str:
        return file_taint(self.config_file)

    @property
    def users_taint(self) -> str:
        return file_taint(self.users_file)

    def source_of(self, user: User) -> str:
        return self.user_sources.get(id(user), self.users_file)

    def clean(self, *names: str) -> bool:
        return not any(
            t == n or t.startswith(n + ".") or n.startswith(t + ".")
            for t in self.tainted
            for n in names
        )


def file_taint(label: str) -> str:
    """The taint marking a whole file as unreadable or invalid."""
    return f"file:{label}"


def run(config: Config, ctx: Context) -> list[str]:
    errors: list[str] = []
    for check in (
        _databases,
        _shards,
        _tls,
        _replica_lag,
        _mapping_rules,
        _sharded_mappings,
        _user_databases,
        _coverage,
        _passwords,
    ):
        errors.extend(check(config, ctx))
    return errors


def _user_label(user: User) -> str:
    where = user.database or ", ".join(user.databases) or "all databases"
    return f'user "{user.name}" (database "{where}")'


def _databases(config: Config, ctx: Context) -> list[str]:
    if not config.databases:
        if ctx.clean(ctx.config_taint, "databases"):
            return [
                f"{ctx.config_file}: no [[databases]] configured; add a [[databases]] entry"
                " or pass -d postgres://user:password@host:port/database"
            ]
        return []
    seen: set[tuple] = set()
    errors = []
    for db in config.databases:
        # The role is part of the key, as in PgDog: its own test setups point a primary and a
        # replica entry at the same server.
        key = (db.name, db.shard, db.host, db.port, db.role)
        if key in seen:
            errors.append(
                f'{ctx.config_file}: [[databases]] lists database "{db.name}" shard '
                f"{db.shard} {db.role} at {db.address} twice; remove one of the entries"
            )
        seen.add(key)
    return errors


def _shards(config: Config, ctx: Context) -> list[str]:
    errors = []
    for name in config.database_names():
        shards = config.shards(name)
        missing = [n for n, hosts in enumerate(shards) if not hosts]
        present = ", ".join(str(n) for n, hosts in enumerate(shards) if hosts)
        for shard in missing:
            errors.append(
                f'{ctx.config_file}: database "{name}" has no [[databases]] entry for '
                f"shard {shard} (it has shards {present}); shard numbers start at 0 "
                "and must not skip any"
            )
    return errors


def _pair(ctx: Context, table: str, owner: object, first: str, second: str) -> list[str]:
    a, b = getattr(owner, first), getattr(owner, second)
    if (a is None) == (b is None):
        return []
    given, missing = (first, second) if a is not None else (second, first)
    return [f"{ctx.config_file}: {table} {given} is set but {missing} is not; set both or neither"]


def _tls(config: Config, ctx: Context) -> list[str]:
    general = config.general
    errors = _pair(ctx, "[general]", general, "tls_certificate", "tls_private_key")
    errors += _pair(ctx, "[general]", general, "tls_server_certificate", "tls_server_private_key")
    for db in config.databases:
        table = f'[[databases]] (database "{db.name}" at {db.address})'
        errors += _pair(ctx, table, db, "tls_server_certificate", "tls_server_private_key")
    return errors


def _replica_lag(config: Config, ctx: Context) -> list[str]:
    lag = config.replica_lag
    if lag is not None and lag.check_interval is not None and lag.max_age is None:
        return [
            f"{ctx.config_file}: [replica_lag] check_interval is set without max_age; "
            "set max_age too"
        ]
    return []


def _mapping_rules(config: Config, ctx: Context) -> list[str]:
    errors = []
    for table in config.sharded_tables:
        for number, rule in enumerate(table.mapping or [], start=1):
            if rule.values is not None and (rule.start is not None or rule.end is not None):
                errors.append(
                    f"{ctx.config_file}: [[sharded_tables]] {table.qualified_name} (database "
                    f'"{table.database}") mapping rule #{number} sets both values and start/end; '
                    "a rule is either a list (values) or a range (start, end)"
                )
    return errors


def _sharded_mappings(config: Config, ctx: Context) -> list[str]:
    errors = []
    for mapping in config.sharded_mappings:
        has_range = mapping.start is not None or mapping.end is not None
        problem = {
            "list": None if mapping.values and not has_range else "needs values and no start/end",
            "range": None
            if has_range and not mapping.values
            else "needs start and/or end and no values",
            "default": None
            if not has_range and not mapping.values
            else "takes no values, start or end",
        }[mapping.kind]
        if problem:
            column = ".".join(p for p in (mapping.table or "*", mapping.column) if p)
            errors.append(
                f"{ctx.config_file}: [[sharded_mappings]] for {column} (database "
                f'"{mapping.database}", shard {mapping.shard}): kind = "{mapping.kind}" '
                f"{problem}"
            )
    return errors


def _user_databases(config: Config, ctx: Context) -> list[str]:
    return [
        f'{ctx.users_file}: user "{u.name}" has no database; set database = "<the name of a '
        '[[databases]] entry>"'
        for u in config.users
        if not (u.database or u.databases or u.all_databases)
    ]


def _coverage(config: Config, ctx: Context) -> list[str]:
    user_keys = ("users.name", "users.database", "users.databases", "users.all_databases")
    if config.general.passthrough_auth != "disabled" or not ctx.clean(ctx.users_taint, *user_keys):
        return []
    return [
        f'{ctx.users_file}: no [[users]] entry for database "{name}"; add one with '
        f'database = "{name}"'
        for name in config.database_names()
        if not any(u.serves(name) for u in config.users)
    ]


def _passwords(config: Config, ctx: Context) -> list[str]:
    auth = config.general.auth_type
    # Any broken [[users]] key may be a misspelt password: skip rather than add a follow-on error.
    if not ctx.clean(
        "general.auth_type", "general.passthrough_auth", ctx.config_taint, ctx.users_taint, "users"
    ):
        return []
    if auth == "trust" or config.general.passthrough_auth != "disabled":
        return []
    errors = []
    for user in config.users:
        if not user.has_secret():
            errors.append(
                f"{ctx.source_of(user)}: {_user_label(user)} has no password; set password "
                'or password_hash, or set auth_type = "trust" in [general]'
            )
        elif not (user.password or user.passwords):
            errors.extend(_hash_fits(user, auth, ctx))
    return errors


def _hash_fits(user: User, auth: str, ctx: Context) -> list[str]:
    kind = password_hash_kind(user.password_hash or "")
    if auth == "md5" and kind == "scram":
        why = "a SCRAM-SHA-256 password_hash cannot check md5 logins"
    elif auth == "scram" and kind == "md5":
        why = "an MD5 password_hash cannot check SCRAM-SHA-256 logins"
    else:
        return []
    return [
        f'{ctx.source_of(user)}: {_user_label(user)}: {why} (auth_type = "{auth}"); give a '
        "password, or a hash of the other kind, or change auth_type"
    ]
