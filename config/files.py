"""The top level of each file: every table pgherd.toml and users.toml may contain."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from .databases import Database
from .fields import LooseSection, Section
from .general import General
from .sections import (
    Fdw,
    Memory,
    Mirroring,
    MultiTenant,
    Otel,
    Plugin,
    ReplicaLag,
    Replication,
    Rewrite,
    Tcp,
)
from .sharding import (
    ManualQuery,
    OmnishardedTables,
    QueryParser,
    ShardedMapping,
    ShardedSchema,
    ShardedTable,
)
from .users import Admin, UsersToml


class PgherdToml(Section):
    """The whole of pgherd.toml (PgDog's pgdog.toml)."""

    general: General = Field(default_factory=General)
    databases: list[Database] = Field(default_factory=list)
    admin: Admin = Field(default_factory=Admin)
    tcp: Tcp = Field(default_factory=Tcp)
    rewrite: Rewrite = Field(default_factory=Rewrite)
    sharded_tables: list[ShardedTable] = Field(default_factory=list)
    sharded_mappings: list[ShardedMapping] = Field(default_factory=list)
    sharded_schemas: list[ShardedSchema] = Field(default_factory=list)
    omnisharded_tables: list[OmnishardedTables] = Field(default_factory=list)
    manual_queries: list[ManualQuery] = Field(default_factory=list)
    query_parsers: list[QueryParser] = Field(default_factory=list)
    multi_tenant: Optional[MultiTenant] = None
    mirroring: list[Mirroring] = Field(default_factory=list)
    plugins: list[Plugin] = Field(default_factory=list)
    replica_lag: Optional[ReplicaLag] = None
    replication: Replication = Field(default_factory=Replication)
    memory: Memory = Field(default_factory=Memory)
    otel: Otel = Field(default_factory=Otel)
    fdw: Fdw = Field(default_factory=Fdw)
    # PgDog tables pgherd takes as they are, without knowing their keys.
    vault: Optional[LooseSection] = None
    resharding: Optional[LooseSection] = None
    control: Optional[LooseSection] = None
    stats: Optional[LooseSection] = None
    query_stats: Optional[LooseSection] = None


__all__ = ["PgherdToml", "UsersToml"]
