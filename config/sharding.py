"""Sharding tables of pgherd.toml: sharded tables and their rules, schemas, omnisharded tables."""

from __future__ import annotations

from typing import Optional

from pydantic import ConfigDict, Field

from .fields import (
    Count,
    DataType,
    Hasher,
    LookupResult,
    MappingKind,
    NonEmpty,
    QueryParserEngine,
    QueryParserLevel,
    Section,
    ShardingValue,
)


class MappingRule(Section):
    """[[sharded_tables.mapping]]: a list rule (values), a range rule (start/end) or the default."""

    shard: Count
    values: Optional[list[ShardingValue]] = None
    start: Optional[ShardingValue] = None
    end: Optional[ShardingValue] = None

    @property
    def kind(self) -> str:
        """ "list", "range" or "default", as PgDog tells the three forms apart."""
        if self.values is not None:
            return "list"
        if self.start is not None or self.end is not None:
            return "range"
        return "default"


class ShardedTable(Section):
    """[[sharded_tables]]: which column of which table holds the sharding key."""

    # "schema" would shadow a BaseModel attribute, so the field is schema_ with TOML key "schema".
    model_config = ConfigDict(populate_by_name=True)

    database: NonEmpty
    column: NonEmpty
    name: Optional[str] = None
    schema_: Optional[str] = Field(default=None, alias="schema")
    data_type: DataType = "bigint"
    hasher: Hasher = "postgres"
    primary: bool = False
    broadcast_null: bool = False
    centroids: list[list[float]] = Field(default_factory=list)
    centroids_path: Optional[str] = None
    centroid_probes: Count = 0
    mapping: Optional[list[MappingRule]] = None
    lookup_query: Optional[str] = None
    lookup_result: LookupResult = "value"

    @property
    def qualified_name(self) -> str:
        """schema.table.column with the parts that are set ("*" for any table)."""
        parts = [p for p in (self.schema_, self.name or "*", self.column) if p]
        return ".".join(parts)


class ShardedMapping(Section):
    """[[sharded_mappings]]: PgDog's older, top-level form of a list/range/default rule."""

    model_config = ConfigDict(populate_by_name=True)

    database: NonEmpty
    column: NonEmpty
    table: Optional[str] = None
    schema_: Optional[str] = Field(default=None, alias="schema")
    kind: MappingKind = "list"
    values: list[ShardingValue] = Field(default_factory=list)
    start: Optional[ShardingValue] = None
    end: Optional[ShardingValue] = None
    shard: Count


class ShardedSchema(Section):
    """[[sharded_schemas]]: every table of a Postgres schema lives on one shard (or on all)."""

    database: NonEmpty
    name: Optional[str] = None
    shard: Count = 0
    all: bool = False


class OmnishardedTables(Section):
    """[[omnisharded_tables]]: tables holding the same rows on every shard."""

    database: NonEmpty
    tables: list[str]
    sticky: bool = False


class ManualQuery(Section):
    """[[manual_queries]]: a query fingerprint PgDog routed to a single shard."""

    fingerprint: NonEmpty


class QueryParser(Section):
    """[[query_parsers]]: per-database query parser settings."""

    database: NonEmpty
    level: QueryParserLevel = "auto"
    engine: QueryParserEngine = "pg_query_protobuf"
