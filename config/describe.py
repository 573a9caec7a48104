"""What `pgherd check` prints: databases, shards, hosts, users and sharding, never passwords."""

from __future__ import annotations

from .model import Config

INDENT = "  "


def describe(config: Config) -> str:
    """A readable summary of the loaded configuration."""
    sections = [
        _header(config),
        _databases(config),
        _users(config),
        _sharded_tables(config),
        _sharded_schemas(config),
        _omnisharded_tables(config),
        _unsupported(config),
    ]
    return "\n\n".join(sections) + "\n"


def _header(config: Config) -> str:
    general = config.general
    files = ", ".join(p for p in (config.config_path, config.users_path) if p)
    return "\n".join(
        [
            f"configuration from {files}" if files else "configuration",
            f"{INDENT}listen {general.host}:{general.port} with {config.worker_count()} workers",
            f"{INDENT}auth_type {general.auth_type}, pooler_mode {general.pooler_mode}, "
            f"default_pool_size {general.default_pool_size}",
        ]
    )


def _databases(config: Config) -> str:
    names = config.database_names()
    if not names:
        return "databases: none"
    lines: list[str] = []
    for name in names:
        lines.append(f'database "{name}"')
        for shard, hosts in enumerate(config.shards(name)):
            lines.append(f"{INDENT}shard {shard}")
            lines.extend(
                f"{INDENT * 2}{db.role:<8} {db.address} ({_host_details(db)})" for db in hosts
            )
    return "\n".join(lines)


def _host_details(db) -> str:
    details = [f"database_name={db.server_database}"]
    if db.user:
        details.append(f"user={db.user}")
    if db.pool_size is not None:
        details.append(f"pool_size={db.pool_size}")
    if db.pooler_mode:
        details.append(f"pooler_mode={db.pooler_mode}")
    return ", ".join(details)


def _users(config: Config) -> str:
    if not config.users:
        return "users: none"
    lines = ["users"]
    for user in config.users:
        databases = [n for n in config.database_names() if user.serves(n)] or [
            user.database or "(none)"
        ]
        for name in databases:
            hosts = config.database_hosts(name)
            if hosts:
                size = config.pool_size(user, hosts[0])
                mode = config.pooler_mode(user, hosts[0])
                min_size = config.min_pool_size(user, hosts[0])
                pool = f"pool_size {size}, min_pool_size {min_size}, pooler_mode {mode}"
            else:
                pool = "no such database in [[databases]]"
            lines.append(f'{INDENT}user "{user.name}" database "{name}": {pool}')
    return "\n".join(lines)


def _sharded_tables(config: Config) -> str:
    if not config.sharded_tables and not config.sharded_mappings:
        return "sharded tables: none"
    lines = ["sharded tables"]
    for table in config.sharded_tables:
        how = f"{table.data_type}, hash {table.hasher}"
        if table.mapping:
            kinds = ", ".join(f"{rule.kind} -> shard {rule.shard}" for rule in table.mapping)
            how = f"{table.data_type}, rules: {kinds}"
        lines.append(f'{INDENT}database "{table.database}": {table.qualified_name} ({how})')
    for mapping in config.sharded_mappings:
        column = ".".join(p for p in (mapping.table or "*", mapping.column) if p)
        lines.append(
            f'{INDENT}database "{mapping.database}": {column} ({mapping.kind} -> '
            f"shard {mapping.shard}, [[sharded_mappings]])"
        )
    return "\n".join(lines)


def _sharded_schemas(config: Config) -> str:
    if not config.sharded_schemas:
        return "sharded schemas: none"
    lines = ["sharded schemas"]
    for schema in config.sharded_schemas:
        name = f'schema "{schema.name}"' if schema.name else "any other schema"
        where = "all shards" if schema.all else f"shard {schema.shard}"
        lines.append(f'{INDENT}database "{schema.database}": {name} -> {where}')
    return "\n".join(lines)


def _omnisharded_tables(config: Config) -> str:
    if not config.omnisharded_tables:
        return "omnisharded tables: none"
    lines = ["omnisharded tables"]
    for group in config.omnisharded_tables:
        sticky = " (sticky)" if group.sticky else ""
        lines.append(f'{INDENT}database "{group.database}": {", ".join(group.tables)}{sticky}')
    return "\n".join(lines)


def _unsupported(config: Config) -> str:
    keys = config.unsupported_keys()
    if not keys:
        return "every key set is acted on"
    lines = ["set but not acted on yet (accepted for PgDog compatibility)"]
    lines.extend(f"{INDENT}{key}" for key in keys)
    return "\n".join(lines)
