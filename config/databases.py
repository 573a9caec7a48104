"""One [[databases]] entry of pgherd.toml: a Postgres host serving one shard of a database."""

from __future__ import annotations

from typing import Optional

from pydantic import AliasChoices, Field

from .fields import (
    Byte,
    Count,
    Millis,
    NonEmpty,
    PoolerMode,
    PoolSize,
    Role,
    Section,
    ServerPort,
    TlsVerify,
)


class Database(Section):
    """A Postgres server; entries sharing a name form one database, grouped by shard."""

    name: NonEmpty
    host: NonEmpty
    port: ServerPort = 5432
    role: Role = "primary"
    shard: Count = 0
    database_name: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = None
    pool_size: Optional[PoolSize] = Field(
        default=None, validation_alias=AliasChoices("pool_size", "max_pool_size")
    )
    min_pool_size: Optional[Count] = None
    pooler_mode: Optional[PoolerMode] = None
    statement_timeout: Optional[Millis] = None
    lock_timeout: Optional[Millis] = None
    idle_timeout: Optional[Millis] = None
    read_only: Optional[bool] = None
    server_lifetime: Optional[Millis] = None
    server_lifetime_jitter: Optional[Millis] = None
    resharding_only: bool = False
    lb_weight: Byte = 255
    # Older PgDog releases mirrored a database by naming its source here.
    mirror_of: Optional[str] = None
    # Per-server TLS, overriding the [general] keys of the same name.
    tls_verify: Optional[TlsVerify] = None
    tls_server_ca_certificate: Optional[str] = None
    tls_server_certificate: Optional[str] = None
    tls_server_private_key: Optional[str] = None

    @property
    def server_database(self) -> str:
        """The database name to ask the Postgres server for (database_name, else name)."""
        return self.database_name or self.name

    @property
    def address(self) -> str:
        """host:port, with IPv6 literals in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
